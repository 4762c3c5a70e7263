"""Verification metrics over all pairs of an evaluation set, exact and in bounded memory:
ROC (TAR against FAR), AUC, TAR@FAR, EER, and the score threshold of each.

A pair is accepted when its score (inner product in float32: cosine similarity of
L2-normalised embeddings) is >= a threshold; TAR (true accept rate, TPR) is the share of
positive pairs (same label) accepted, FAR (false accept rate, FPR) the share of negative pairs
accepted. Without a gallery the pairs are the unordered pairs i < j of the query set; with a
gallery every (query, gallery item) except a query's own copy (``self_index``).

Exact without materialising the pairs (SOP's test set has 1.8e9): each float32 score maps to
a 32-bit key that orders as the floats do (-0.0 taken as +0.0; REFERENCE-3 §8.3), so counting
positives and negatives per key reproduces the sorted-score computation of scikit-learn's
``roc_curve`` exactly. A small set (its keys fit half the memory budget) is counted by
sorting every key. A larger one is scored block by block and counted per coarse bin (the key's
top 20 bits, 2^20 bins) and, in the same pass, per key (the low 12 bits) inside the bins that
decide a result: those holding both positives and negatives (AUC's ties), the bin where the FAR
of each target is crossed and the one where FAR meets 1 - TAR (EER), each with the non-empty
bin above it. Those bins are guessed before the pass (the positive pairs' bins, scored class by
class, and a 1/64 sample of query rows); a bin guessed wrong costs a further pass, never
exactness. With ``resolve_all`` every non-empty bin is counted per key (the full ROC). The
memory is 2 x 2^20 counters plus 32 KiB per resolved bin (at most half the budget), whatever
the number of pairs. The time: the set's matrix product with itself (as the retrieval
evaluation) plus about 22 ns a pair on 2 CPU cores for the keys and counters (3.7x the retrieval
evaluation at SOP scale; benchmarks/RESULTS.md).

Definitions (REFERENCE-3 §8.1-8.2):

- AUC: the trapezoidal area under the ROC = the Mann-Whitney statistic, tied positive /
  negative pairs counting 1/2 (as ``sklearn.metrics.roc_auc_score``).
- TAR@FAR=f (conservative; the default): at the lowest threshold whose FAR <= f, the largest
  TAR reachable without exceeding f. NaN when f * negatives < 1: the set cannot resolve it.
  ``rule="nearest"`` is insightface's IJB-B/C rule (the ROC point, ``drop_intermediate``
  as scikit-learn, whose FAR is nearest f; its FAR may exceed f).
- EER: where FAR = 1 - TAR, linearly interpolated between the two ROC points around the
  crossing (not the nearer point's mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .blocks import exact_float32
from .checks import as_query_gallery

__all__ = ["FARS", "PairScoreCounts", "float_of_key", "key_of_float", "pair_score_counts"]

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
"""The FAR targets of TAR@FAR (keys ``tar@far=1e-1`` ... ``tar@far=1e-5``)."""

FINE_BITS = 12  # low key bits resolved in pass 2
NUM_COARSE = 1 << (32 - FINE_BITS)  # 2^20 coarse bins
NUM_FINE = 1 << FINE_BITS
BYTES_PER_PAIR = 64  # a block's score, key, label match and index temporaries
BYTES_PER_BIN = 2 * NUM_FINE * 4  # a resolved bin's int32 counters (reduced 256 bins at a time)

SORT_BYTES_PER_PAIR = 32  # a small set's keys, kept and sorted
AllReduce = Callable[[Tensor], None]  # sums a tensor over ranks, in place


def key_of_float(scores: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) of float32 ``scores``, ordered as the scores (-0.0 = +0.0)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), ~bits)


def float_of_key(keys: np.ndarray) -> np.ndarray:
    """The float32 values of int64 ``keys`` (inverse of :func:`key_of_float`), as float64."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys >= (1 << 31), keys - (1 << 31), ~keys)
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


@dataclass
class PairScoreCounts:
    """Positive and negative pair counts per score, resolved where results need it.

    ``keys`` (U,) int64 decreasing: the lowest key of each unit (one score, or a whole coarse
    bin that decides no FAR target nor the EER); ``positive`` and ``negative`` (U,) int64
    counts per unit; ``ties_twice``: twice the positive / negative pairs ranked within one unit
    as AUC counts them (a positive above a negative 2, tied 1), exact from the keys.
    ``resolved_all``: every unit is one score.
    """

    keys: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    ties_twice: int
    fars: tuple[float, ...]
    resolved_all: bool

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())

    @property
    def num_negative(self) -> int:
        return int(self.negative.sum())

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        return np.cumsum(self.positive), np.cumsum(self.negative)

    def _check_pairs(self) -> None:
        if self.num_positive == 0 or self.num_negative == 0:
            raise ValueError(
                f"verification needs positive and negative pairs; this set has "
                f"{self.num_positive:,} positive and {self.num_negative:,} negative pairs"
            )

    def roc(self, drop_intermediate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(far, tar, threshold) by decreasing threshold, the first point (0, 0, +inf), as
        ``sklearn.metrics.roc_curve`` (every distinct score when ``resolved_all``; else the
        exact points at the edges of the unresolved coarse bins as well)."""
        self._check_pairs()
        tps, fps = self._cumulative()
        thresholds = float_of_key(self.keys)
        if drop_intermediate and len(tps) > 2:
            turns = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
            keep = np.flatnonzero(np.r_[True, turns, True])
            tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
        far = np.r_[0.0, fps / fps[-1]]
        tar = np.r_[0.0, tps / tps[-1]]
        return far, tar, np.r_[np.inf, thresholds]

    def auc(self) -> float:
        """Area under the ROC (ties count 1/2), exact: integer counts, one division."""
        self._check_pairs()
        _, fps = self._cumulative()
        below = self.num_negative - fps  # negatives scored below each unit
        twice = int(np.sum(self.positive * 2 * below, dtype=np.int64)) + self.ties_twice
        return twice / (2 * self.num_positive * self.num_negative)

    def _conservative(self, far: float) -> int:
        """Index of the last unit (lowest threshold) with FAR <= far; -1: none (+inf)."""
        _, fps = self._cumulative()
        return int(np.searchsorted(fps, far * self.num_negative, side="right")) - 1

    def tar_at_far(self, far: float, rule: str = "conservative") -> tuple[float, float]:
        """(TAR, threshold) at FAR ``far`` (module docstring); (nan, nan) when
        ``far * num_negative < 1``."""
        self._check_pairs()
        if far * self.num_negative < 1:
            return float("nan"), float("nan")
        if rule == "nearest":
            if not self.resolved_all:
                raise ValueError("rule='nearest' needs the full ROC: resolve_all=True")
            fpr, tpr, thresholds = self.roc(drop_intermediate=True)
            gap = np.abs(fpr - far)
            best = np.flatnonzero(gap == gap.min())
            i = best[np.argmax(tpr[best])]
            return float(tpr[i]), float(thresholds[i])
        if rule != "conservative":
            raise ValueError(f"rule must be 'conservative' or 'nearest', got {rule!r}")
        self._require(far)
        i = self._conservative(far)
        if i < 0:
            return 0.0, float("inf")
        tps, _ = self._cumulative()
        return float(tps[i] / self.num_positive), float(float_of_key(self.keys[i]))

    def threshold_at_far(self, far: float) -> float:
        """The conservative threshold at FAR ``far``; ValueError when the set has fewer than
        1 / far negative pairs."""
        self._check_pairs()
        if not 0 < far < 1:
            raise ValueError(f"a FAR target must lie in (0, 1), got {far}")
        if far * self.num_negative < 1:
            raise ValueError(
                f"a FAR of {far:g} needs at least {int(np.ceil(1 / far)):,} negative pairs; "
                f"this set has {self.num_negative:,} (use more images or a larger FAR)"
            )
        return self.tar_at_far(far)[1]

    def threshold_at_precision(self, precision: float) -> float:
        """The lowest threshold whose precision TP / (TP + FP) >= ``precision`` (the most
        positives accepted at that precision); ValueError when no threshold reaches it."""
        self._check_pairs()
        if not self.resolved_all:
            raise ValueError("a precision target needs the full ROC: resolve_all=True")
        tps, fps = self._cumulative()
        reached = np.flatnonzero(tps / (tps + fps) >= precision)
        if reached.size == 0:
            raise ValueError(f"no threshold reaches a precision of {precision:g} on this set")
        return float(float_of_key(self.keys[reached[-1]]))

    def eer(self) -> tuple[float, float]:
        """(EER, threshold): FAR = 1 - TAR interpolated between the two ROC points around the
        crossing; the threshold is that of the first point with FAR >= 1 - TAR."""
        far, tar, thresholds = self.roc()
        fnr = 1.0 - tar
        j = int(np.argmax(far >= fnr))  # exists: the last point has FAR 1, FNR 0
        if j == 0:
            return 0.0, float(thresholds[0])
        gap_before, gap_after = fnr[j - 1] - far[j - 1], far[j] - fnr[j]
        t = gap_before / (gap_before + gap_after)
        return float(far[j - 1] + t * (far[j] - far[j - 1])), float(thresholds[j])

    def histogram(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) counts of the scores in each ``[edges[i], edges[i+1])`` (an
        unresolved coarse bin, 2^-8 of its power of two wide, counts at its lowest score)."""
        where = np.searchsorted(edges, float_of_key(self.keys), side="right") - 1
        inside = (where >= 0) & (where < len(edges) - 1)
        size = len(edges) - 1
        pos = np.bincount(where[inside], self.positive[inside], size).astype(np.int64)
        neg = np.bincount(where[inside], self.negative[inside], size).astype(np.int64)
        return pos, neg

    def _require(self, far: float) -> None:
        if not (self.resolved_all or far in self.fars):
            raise ValueError(
                f"FAR {far:g} was not resolved: pass it in fars= of pair_score_counts "
                f"(resolved: {', '.join(f'{f:g}' for f in self.fars)})"
            )


def pair_score_counts(
    query_emb: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_emb: Tensor | np.ndarray | None = None,
    gallery_labels: Tensor | np.ndarray | Sequence[int] | None = None,
    *,
    self_index: Tensor | np.ndarray | Sequence[int] | None = None,
    fars: Sequence[float] = FARS,
    resolve_all: bool = False,
    memory_budget_bytes: int = 2**30,
    shard: tuple[int, int] = (0, 1),
    all_reduce: AllReduce | None = None,
) -> PairScoreCounts:
    """Count the positive and negative pair scores of an evaluation set (module docstring).

    Args:
        query_emb, query_labels: (Q, d) embeddings and (Q,) integer labels.
        gallery_emb, gallery_labels: (G, d) and (G,), or None: pairs within the query set.
        self_index: with a gallery, (Q,) gallery index of each query's own copy (-1 = none).
        fars: the FAR targets whose thresholds are resolved exactly.
        resolve_all: resolve every score (the full ROC; calibration sets, tests).
        memory_budget_bytes: bound on the working memory (pair blocks and counters).
        shard, all_reduce: (rank, world size) and a function summing a tensor over ranks in
            place: each rank scores every world-th block of query rows (torchrun).
    """
    query, query_labels, gallery, gallery_labels, self_index = as_query_gallery(
        query_emb, query_labels, gallery_emb, gallery_labels, self_index
    )
    fars = tuple(float(f) for f in fars)
    pairs = _Pairs(query, query_labels, gallery, gallery_labels, self_index, memory_budget_bytes)
    num_pairs = pairs.num_pairs()
    if num_pairs * SORT_BYTES_PER_PAIR <= memory_budget_bytes // 2:
        # a small set: every key, in one pass; each rank alike (no sharding, no exchange)
        return pairs.sorted_counts(fars)
    # a resolved bin costs BYTES_PER_BIN: at most half the budget, and no more counters than
    # 16 a pair (small sets: a few quick passes rather than idle counters)
    bins_per_round = max(
        16, min((memory_budget_bytes // 2) // BYTES_PER_BIN, 16 * num_pairs // (2 * NUM_FINE))
    )

    # one pass counts per coarse bin, and per key in the bins likely to need it; a further
    # pass resolves those that turn out to need it and were not guessed
    guess = np.zeros(0, dtype=np.int64)
    if not resolve_all:
        guess = np.sort(_likely_bins(pairs, fars)[:bins_per_round])
    coarse, fine = pairs.count(guess, shard, all_reduce, with_coarse=True)
    coarse_pos, coarse_neg = coarse[1::2], coarse[0::2]
    needed, decisive = _bins_to_resolve(coarse_pos, coarse_neg, fars, resolve_all)
    rounds = [(guess, fine)]
    missing = np.setdiff1d(needed, guess)
    for start in range(0, len(missing), bins_per_round):
        chosen = missing[start : start + bins_per_round]
        rounds.append((chosen, pairs.count(chosen, shard, all_reduce, with_coarse=False)[1]))
    return _units(coarse_pos, coarse_neg, rounds, needed, decisive, fars, resolve_all)


def _likely_bins(pairs: _Pairs, fars: tuple[float, ...]) -> np.ndarray:
    """Coarse bins likely to need resolving, the likeliest first: those around each FAR
    target's and the EER's crossing in a sample of query rows (within four standard errors of
    the sample's counts), then those of the positive pairs (scored class by class, cheap; with
    their neighbours, as a block's product may move a score by one unit in the last place). A
    wrong guess costs time (one more pass), never exactness."""
    near = set()
    pos, neg = pairs.sample_counts()
    order = np.flatnonzero((pos + neg) > 0)[::-1]
    fps, tps = np.cumsum(neg[order]), np.cumsum(pos[order])
    if len(order) and fps[-1] > 0:
        for far in fars:
            expected = far * fps[-1]
            spread = 4 * np.sqrt(expected) + 2
            low, high = np.searchsorted(fps, [expected - spread, expected + spread])
            near.update(order[max(0, low - 1) : high + 2].tolist())
        if tps[-1] > 0:
            gap = fps / fps[-1] - (1 - tps / tps[-1])
            crossing = int(np.argmax(gap >= 0))
            near.update(order[max(0, crossing - 3) : crossing + 4].tolist())
    positive = np.unique(pairs.positive_keys() >> FINE_BITS)
    positive = np.unique(np.concatenate([positive - 1, positive, positive + 1]))
    positive = positive[(positive >= 0) & (positive < NUM_COARSE)]
    near = np.array(sorted(near), dtype=np.int64)
    return np.concatenate([near, np.setdiff1d(positive, near)])


def _bins_to_resolve(
    pos: np.ndarray, neg: np.ndarray, fars: tuple[float, ...], resolve_all: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(needed, decisive): ascending coarse bins whose keys must be counted (every non-empty
    one with ``resolve_all``; else those with both kinds of pairs, whose ties AUC counts, and
    the decisive ones) and those kept key by key in the result: where each FAR target is
    crossed and where FAR meets 1 - TAR, each with the non-empty bin above it."""
    nonempty = np.flatnonzero((pos + neg) > 0)
    if resolve_all:
        return nonempty, nonempty
    decisive = set()
    order = nonempty[::-1]  # decreasing score
    fps, tps = np.cumsum(neg[order]), np.cumsum(pos[order])
    if len(order) and fps[-1] > 0:
        crossings = [int(np.flatnonzero(fps > far * fps[-1])[0]) for far in fars]
        if tps[-1] > 0:
            crossings.append(int(np.flatnonzero(fps / fps[-1] >= 1 - tps / tps[-1])[0]))
        for i in crossings:  # and the bin above: its lowest score may be the threshold
            decisive.update(order[max(0, i - 1) : i + 1].tolist())
    decisive = np.array(sorted(decisive), dtype=np.int64)
    both = np.flatnonzero((pos > 0) & (neg > 0))
    return np.union1d(both, decisive), decisive


def _units(
    coarse_pos: np.ndarray,
    coarse_neg: np.ndarray,
    rounds: list[tuple[np.ndarray, np.ndarray]],
    needed: np.ndarray,
    decisive: np.ndarray,
    fars: tuple[float, ...],
    resolve_all: bool,
) -> PairScoreCounts:
    """Decreasing units: each coarse bin, but the decisive bins key by key; ties counted per
    key in every needed bin. ``rounds``: (bins (B,), counts (B, 2, 2^FINE_BITS) [negative,
    positive]) as counted."""
    ties_twice = 0
    keys, pos, neg = [], [], []
    pieces = [(b[i : i + 256], c[i : i + 256]) for b, c in rounds for i in range(0, len(b), 256)]
    for bins, counts in pieces:  # 256 bins at a time: int64 copies of 16 MiB
        use = np.isin(bins, needed)
        bins, counts = bins[use], counts[use].astype(np.int64)
        negative, positive = counts[:, 0], counts[:, 1]
        keep = np.isin(bins, decisive)
        # kept bins become units of one key each: only their ties are not counted by the units
        below = np.cumsum(negative, axis=1) - negative  # within the bin
        below[keep] = 0
        ties_twice += int(np.sum(positive * (2 * below + negative), dtype=np.int64))
        slot, key = np.nonzero(counts[keep].sum(axis=1) > 0)
        keys.append((bins[keep][slot] << FINE_BITS) + key)
        neg.append(negative[keep][slot, key])
        pos.append(positive[keep][slot, key])
    whole = np.setdiff1d(np.flatnonzero((coarse_pos + coarse_neg) > 0), decisive)
    ties_twice += int(np.sum(coarse_pos[whole] * coarse_neg[whole] * ~np.isin(whole, needed)))
    keys.append(whole << FINE_BITS)
    pos.append(coarse_pos[whole])
    neg.append(coarse_neg[whole])
    all_keys = np.concatenate(keys)
    order = np.argsort(-all_keys, kind="stable")
    return PairScoreCounts(
        all_keys[order],
        np.concatenate(pos)[order].astype(np.int64),
        np.concatenate(neg)[order].astype(np.int64),
        ties_twice,
        fars,
        resolve_all,
    )


def _accumulate(counts: Tensor, index: Tensor) -> None:
    """``counts[i] += 1`` for each ``i`` of ``index`` (1-D): a bincount when the counters are
    few, else an index_add (no counter-sized temporary per block)."""
    if counts.numel() <= 4 * index.numel():
        counts += torch.bincount(index, minlength=counts.numel()).to(counts.dtype)
    else:
        counts.index_add_(0, index, torch.ones_like(index, dtype=counts.dtype))


MASKED = torch.iinfo(torch.int32).min  # key of the pairs not counted: a NaN's, in coarse bin 0


def _signed_keys(scores: Tensor) -> Tensor:
    """int32 keys ordered as the float32 ``scores`` (the key of :func:`key_of_float` - 2^31)."""
    bits = (scores + 0.0).view(torch.int32)  # -0.0 + 0.0 = +0.0
    return bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF))  # in place: one copy


class _Pairs:
    """The pairs of an evaluation set, scored block by block (query rows x gallery columns,
    about ``budget / 128`` pairs a block) and counted per key."""

    def __init__(
        self,
        query: Tensor,
        query_labels: Tensor,
        gallery: Tensor | None,
        gallery_labels: Tensor,
        self_index: Tensor | None,
        budget: int,
    ) -> None:
        self.query, self.query_labels = query, query_labels
        self.gallery = query if gallery is None else gallery
        self.gallery_labels, self.self_index = gallery_labels, self_index
        self.within = gallery is None  # the pairs i < j of one set
        self.pairs_per_block = max(1 << 12, (budget - 32 * NUM_COARSE) // (2 * BYTES_PER_PAIR))

    def num_pairs(self) -> int:
        num_query, num_gallery = self.query.shape[0], self.gallery.shape[0]
        return num_query * (num_query - 1) // 2 if self.within else num_query * num_gallery

    def count(
        self,
        bins: np.ndarray,
        shard: tuple[int, int],
        all_reduce: AllReduce | None,
        with_coarse: bool,
        rows: Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Counts over the pairs (this rank's blocks, summed over ranks): per coarse bin,
        (2 NUM_COARSE,) int64 as [bin, positive] (zeros without ``with_coarse``), and per key
        inside ``bins`` (B,), (B, 2, NUM_FINE) int32 as [bin, negative / positive, key].
        ``rows``: only these query rows, each against every gallery item but itself (a
        sample)."""
        device = self.query.device
        # fine counters: an 8192-counter block per resolved bin, [key, positive?] interleaved,
        # after a first block where the pairs of the other bins land (dropped)
        base_of_bin = torch.zeros(NUM_COARSE, dtype=torch.int32, device=device)
        base_of_bin[torch.as_tensor(bins, dtype=torch.long, device=device)] = torch.arange(
            1, len(bins) + 1, dtype=torch.int32, device=device
        ) * (2 * NUM_FINE)
        coarse = torch.zeros(2 * NUM_COARSE, dtype=torch.int64, device=device)
        fine = torch.zeros((len(bins) + 1) * 2 * NUM_FINE, dtype=torch.int32, device=device)
        rank, world = shard
        with exact_float32(device):
            for block, (r0, r1, c0, c1) in enumerate(self._blocks(rows)):
                if block % world != rank:
                    continue
                keys, positive = self._keys(r0, r1, c0, c1, rows)
                bin_of_pair = (keys >> FINE_BITS).add_(NUM_COARSE // 2)
                if with_coarse:
                    index = (bin_of_pair << 1).bitwise_or_(positive)
                    coarse += torch.bincount(index.flatten(), minlength=2 * NUM_COARSE)
                    del index
                if len(bins):
                    index = base_of_bin[bin_of_pair]  # int32 arithmetic: < 2^31 counters
                    within = (keys & (NUM_FINE - 1)).bitwise_left_shift_(1).bitwise_or_(positive)
                    _accumulate(fine, index.add_(within).flatten())
        if all_reduce is not None:
            if with_coarse:
                all_reduce(coarse)
            all_reduce(fine)
        coarse[:2] = 0  # coarse bin 0: the pairs not counted
        fine_counts = fine[2 * NUM_FINE :].view(len(bins), NUM_FINE, 2).permute(0, 2, 1)
        fine_counts = fine_counts.cpu().numpy()
        return coarse.cpu().numpy(), fine_counts

    def _blocks(self, rows: Tensor | None) -> list[tuple[int, int, int, int]]:
        num_query = self.query.shape[0] if rows is None else rows.shape[0]
        num_gallery = self.gallery.shape[0]
        columns = min(num_gallery, max(256, self.pairs_per_block // 1024))
        step = max(1, min(num_query, self.pairs_per_block // columns))
        out = []
        for r0 in range(0, num_query, step):
            r1 = min(r0 + step, num_query)
            first = r0 if self.within and rows is None else 0
            out += [
                (r0, r1, c0, min(c0 + columns, num_gallery))
                for c0 in range(first, num_gallery, columns)
            ]
        return out

    def _keys(
        self, r0: int, r1: int, c0: int, c1: int, rows: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Signed keys (r, c) int32 of a block's pairs (MASKED where not a pair) and whether
        each is positive (r, c) int32."""
        take = torch.arange(r0, r1, device=self.query.device) if rows is None else rows[r0:r1]
        query = self.query[r0:r1] if rows is None else self.query[take]
        keys = _signed_keys(query @ self.gallery[c0:c1].T)
        positive = (self.query_labels[take, None] == self.gallery_labels[None, c0:c1]).int()
        columns = torch.arange(c0, c1, device=keys.device)[None, :]
        if self.within and rows is None and c0 < r1:  # the pairs i < j only
            keys.masked_fill_(columns <= take[:, None], MASKED)
        own = take if self.within else (None if self.self_index is None else self.self_index[take])
        if own is not None and (rows is not None or not self.within):
            keys.masked_fill_(columns == own[:, None], MASKED)
        return keys, positive

    def sorted_counts(self, fars: tuple[float, ...]) -> PairScoreCounts:
        """Every key counted by sorting the keys of all pairs (2 x 8 bytes a pair)."""
        found = []
        for r0, r1, c0, c1 in self._blocks(None):
            keys, positive = self._keys(r0, r1, c0, c1, None)
            kept = keys != MASKED
            found.append((keys[kept].long() + (1 << 31)) * 2 + positive[kept])
        if not found:
            empty = np.zeros(0, dtype=np.int64)
            return PairScoreCounts(empty, empty, empty, 0, fars, True)
        values, counts = torch.unique(torch.cat(found), return_counts=True)
        keys, positive = (values >> 1).cpu().numpy(), (values & 1).bool().cpu().numpy()
        counts = counts.cpu().numpy()
        distinct = np.unique(keys)  # ascending
        pos = np.zeros(len(distinct), dtype=np.int64)
        neg = np.zeros(len(distinct), dtype=np.int64)
        where = np.searchsorted(distinct, keys)
        np.add.at(pos, where[positive], counts[positive])
        np.add.at(neg, where[~positive], counts[~positive])
        ties_twice = int(np.sum(pos * neg))
        return PairScoreCounts(
            distinct[::-1].copy(), pos[::-1].copy(), neg[::-1].copy(), ties_twice, fars, True
        )

    def positive_keys(self) -> np.ndarray:
        """Unsigned keys (P,) int64 of the positive pairs, scored a group of classes at a time
        (their scores may differ from the blocks' in the last bit: a guess, not a count)."""
        order = torch.argsort(self.query_labels, stable=True)
        found = []
        for chunk in torch.split(order, 2048):
            mine = torch.isin(self.gallery_labels, self.query_labels[chunk]).nonzero().flatten()
            scores = self.query[chunk] @ self.gallery[mine].T
            same = self.query_labels[chunk, None] == self.gallery_labels[None, mine]
            if self.within:
                same &= chunk[:, None] != mine[None, :]
            elif self.self_index is not None:
                same &= self.self_index[chunk, None] != mine[None, :]
            found.append(key_of_float(scores[same]))
        return torch.cat(found).cpu().numpy() if found else np.zeros(0, dtype=np.int64)

    def sample_counts(self, share: int = 64, least: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) counts per coarse bin of a seeded sample of query rows (every
        row of small sets) against all gallery items but their own."""
        num_query = self.query.shape[0]
        size = min(num_query, max(least, num_query // share))
        generator = torch.Generator().manual_seed(0)
        rows = torch.randperm(num_query, generator=generator)[:size].sort().values
        no_bins = np.zeros(0, dtype=np.int64)
        coarse, _ = self.count(
            no_bins, (0, 1), None, with_coarse=True, rows=rows.to(self.query.device)
        )
        return coarse[1::2], coarse[0::2]
