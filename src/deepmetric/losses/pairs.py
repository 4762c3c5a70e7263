"""Pair machinery shared by every pair-based loss: :class:`PairLoss` (the common call and
input checks), :class:`Pairs` (similarities and pair sets of one call) and :func:`build_pairs`.

A loss sees B anchors (``embeddings``, ``labels``) and M references. Without a reference
set the references are the batch itself and each anchor's own column (the diagonal) is
excluded. With a reference set (cross-batch memory, a gathered batch) the caller may name,
for each anchor, the reference slot that holds its own copy (``self_index``; -1 = none):
only that one entry is excluded. Self-pairs are never removed by a similarity threshold,
so genuine duplicates (similarity exactly 1) stay valid pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from ._autograd import cross_similarity, gram


class EmbeddingError(ValueError):
    """Embeddings a loss cannot use: NaN or inf, or rows that are not unit vectors.
    ``problem`` is the finding alone (e.g. "embeddings contain NaN or inf"); the message
    adds what to do about it."""

    def __init__(self, problem: str, advice: str = "") -> None:
        super().__init__(problem + advice)
        self.problem = problem


class SameLists(NamedTuple):
    """Each anchor's same-label reference slots, padded to C = the largest count of one
    label among the references (at least 1).

    index: (B, C) int64 slots in ascending order; in a row whose label occurs among the
        references every entry (padding repeats the last slot) is one of its slots; in a row
        whose label does not occur, the entries are arbitrary.
    positive: (B, C) bool, a real entry that is not the anchor's own slot (each positive
        slot once). Updates written through ``index`` must be scatter-adds of values that are
        0 where ``positive`` is False, or writes that are equal for all entries of a row.
    has_group: (B,) bool, the anchor's label occurs among the references.
    num_same: (B,) int64, the number of same-label slots (own slot included).
    """

    index: Tensor
    positive: Tensor
    has_group: Tensor
    num_same: Tensor


@dataclass
class Pairs:
    """Everything a pair-based loss needs about one batch.

    sim: (B, M) cosine similarities anchors x references, at least float32 (no autocast).
    labels: (B,) anchor labels; ref_labels: (M,) reference labels.
    in_batch: True when the references are the batch itself (M = B, same order).
    dim: d, the embedding dimension.
    self_rows, self_cols, self_valid: (S,) the anchors' own (row, slot) entries, excluded
        where self_valid (a fixed-size description, so no GPU sync is needed to build it).
    The (B, M) bool masks ``same``, ``pos``, ``neg`` and the padded ``same_lists`` are
    computed on first use, so a loss pays only for what it reads.
    """

    sim: Tensor
    labels: Tensor
    ref_labels: Tensor
    in_batch: bool
    dim: int
    self_rows: Tensor
    self_cols: Tensor
    self_valid: Tensor

    @cached_property
    def same(self) -> Tensor:
        """(B, M) bool, same label (the anchors' own slots included)."""
        return self.labels[:, None] == self.ref_labels[None, :]

    @cached_property
    def pos(self) -> Tensor:
        """(B, M) bool, same label and not the anchor's own slot."""
        pos = self.same.clone()
        index = (self.self_rows, self.self_cols)
        pos[index] = pos[index] & ~self.self_valid
        return pos

    @cached_property
    def neg(self) -> Tensor:
        """(B, M) bool, different label."""
        return ~self.same

    @cached_property
    def same_lists(self) -> SameLists:
        """Each anchor's same-label reference slots as padded (B, C) lists (see
        :class:`SameLists`), from a stable sort of the reference labels: no (B, M) mask.
        One host sync (C)."""
        sorted_labels, order = torch.sort(self.ref_labels, stable=True)
        start = torch.searchsorted(sorted_labels, self.labels)
        count = torch.searchsorted(sorted_labels, self.labels, right=True) - start
        width = max(1, int(count.max()))
        offsets = torch.arange(width, device=self.sim.device)
        in_group = offsets[None, :] < count[:, None]
        # padding repeats the group's last slot, so every entry of a row with a group is in it
        last = (count - 1).clamp(min=0)[:, None]
        at = (start[:, None] + torch.minimum(offsets[None, :], last)).clamp(max=order.numel() - 1)
        index = order[at]
        if self.in_batch:  # anchor i's own slot is slot i
            own = self.self_cols
        else:
            own = torch.full_like(self.labels, -1)
            own[self.self_rows] = torch.where(self.self_valid, self.self_cols, -1)
        return SameLists(index, in_group & (index != own[:, None]), count > 0, count)

    def fill_same(self, x: Tensor, value: float) -> Tensor:
        """A copy of the (B, M) tensor x with every same-label slot (own slots included) set
        to ``value``: x's negatives only, without building a mask."""
        lists = self.same_lists
        values = torch.where(lists.has_group[:, None], value, x.gather(1, lists.index))
        return x.clone().scatter_(1, lists.index, values)

    def without_self(self, x: Tensor, value: float, inplace: bool = False) -> Tensor:
        """The (B, M) tensor x (a copy unless ``inplace``) with the anchors' own slots set to
        ``value``."""
        if self.in_batch:  # the own slots are the diagonal
            return (x if inplace else x.clone()).fill_diagonal_(value)
        index = (self.self_rows, self.self_cols)
        values = torch.where(self.self_valid, value, x[index])
        return x.index_put_(index, values) if inplace else x.index_put(index, values)

    def num_pairs(self) -> Tensor:
        """Number of (anchor, reference) pairs, i.e. B x M minus the anchors' own slots."""
        return self.sim.numel() - self.self_valid.sum()

    def distance(self) -> Tensor:
        """(B, M) Euclidean distance of unit vectors, sqrt(2 - 2 S), clamped away from 0.

        The clamp (1e-12 under the root) keeps the gradient finite for duplicates.
        """
        return unit_distance(self.sim)


def unit_distance(sim: Tensor) -> Tensor:
    """Euclidean distance of unit vectors from their cosine, sqrt(2 - 2 S), clamped at 1e-12
    under the root (finite gradient for duplicates)."""
    return (2.0 - 2.0 * sim).clamp(min=1e-12).sqrt()


# Row norms are accepted in 1 +- NORM_TOLERANCE. bfloat16 rounding moves a unit vector's norm
# by up to about 2 x 2^-8 (the norm and each quotient of the division rounded): F.normalize
# under CPU bfloat16 autocast, cast to float32, gives norms within 6.3e-3 of 1 for d = 2 to
# 2048 (float16: 7.6e-4). Raw model outputs essentially never fall in this band.
NORM_TOLERANCE = 1e-2


def check_inputs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    self_index: Tensor | None,
) -> None:
    """Raise ValueError with a clear message for malformed loss inputs (shapes, dtypes)."""
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be (B, d), B >= 1, got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (B,) with B = {embeddings.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is not None:
        if ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1] or len(ref_emb) == 0:
            raise ValueError(
                f"ref_emb must be (M, {embeddings.shape[1]}), M >= 1, "
                f"got shape {tuple(ref_emb.shape)}"
            )
        if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]:
            raise ValueError(
                f"ref_labels must be (M,) with M = {ref_emb.shape[0]}, "
                f"got shape {tuple(ref_labels.shape)}"
            )
    elif self_index is not None:
        raise ValueError("self_index is only meaningful with ref_emb")
    if self_index is not None and (
        self_index.dim() != 1 or self_index.shape[0] != embeddings.shape[0]
    ):
        raise ValueError(f"self_index must be (B,), got shape {tuple(self_index.shape)}")


def check_values(
    sim: Tensor,
    norms: Tensor,
    ref_norms: Tensor | None,
    self_index: Tensor | None,
) -> None:
    """All value checks of one loss call, read back in one host sync.

    sim: (B, M) similarities; NaN or inf anywhere in the inputs shows up in their sum.
    norms: (B,) anchor row norms; ref_norms: (M,) reference row norms (None: not checked, as
        in-batch); each must lie in 1 +- NORM_TOLERANCE (the losses assume unit vectors).
    self_index: (B,) must lie in [-1, M).
    """
    stats = [sim.detach().sum(), *torch.aminmax(norms)]
    if ref_norms is not None:
        stats += [*torch.aminmax(ref_norms)]
    if self_index is not None:
        stats.append(((self_index < -1) | (self_index >= sim.shape[1])).any())
    values = torch.stack([s.float() for s in stats]).tolist()  # the one host sync
    if not math.isfinite(values[0]):
        which = "embeddings" if not math.isfinite(values[1] + values[2]) else "ref_emb"
        raise EmbeddingError(
            f"{which} contain NaN or inf", " (check the model output / learning rate)"
        )
    if self_index is not None and values[-1]:
        raise ValueError(f"self_index must lie in [-1, {sim.shape[1]}) (-1 = no own copy)")
    check_unit_norms("embeddings", *values[1:3])
    if ref_norms is not None:
        check_unit_norms("ref_emb", *values[3:5])


def row_norms(x: Tensor) -> Tensor:
    """(N, d) -> (N,) Euclidean norms of the rows, detached: one pass over x."""
    return torch.linalg.vector_norm(x.detach(), dim=1)


def check_unit_norms(name: str, low: float, high: float) -> None:
    """Raise :class:`EmbeddingError` when the row norms of ``name``, in [low, high], are not
    all 1 (within NORM_TOLERANCE), saying how to normalise."""
    if abs(low - 1.0) <= NORM_TOLERANCE and abs(high - 1.0) <= NORM_TOLERANCE:
        return
    raise EmbeddingError(
        f"{name} are not L2-normalised: row norms in [{low:.4g}, {high:.4g}]",
        f", expected 1 +- {NORM_TOLERANCE:g}. The losses compare unit vectors (cosine "
        "similarity); "
        f"normalise with torch.nn.functional.normalize({name}, dim=1), or, in a deepmetric "
        "config, keep the model option model.l2_normalize: true",
    )


def build_pairs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
    *,
    check_ref_norms: bool = True,
) -> Pairs:
    """Similarities and the pair description of one loss call, inputs checked.

    embeddings: (B, d) L2-normalised anchors; labels: (B,) integer class ids.
    ref_emb, ref_labels: (M, d) L2-normalised, (M,) reference set; None = the batch itself.
    self_index: (B,) long, the reference slot holding anchor i's own copy, -1 for none.
    check_ref_norms: False skips the unit-norm check of ref_emb's rows (one pass over M x d)
        for a caller that checked them when it stored them (CrossBatchMemory, at enqueue).
    Raises ValueError for malformed inputs, NaN or inf, or rows that are not unit vectors.
    """
    check_inputs(embeddings, labels, ref_emb, ref_labels, self_index)
    dtype = torch.promote_types(embeddings.dtype, torch.float32)  # float32, or float64 in tests
    in_batch = ref_emb is None
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        anchors = embeddings.to(dtype)
        norms = row_norms(anchors)
        if in_batch:
            sim = gram(anchors)
            ref_labels, ref_norms = labels, None
        else:
            refs = ref_emb.to(dtype)
            sim = cross_similarity(anchors, refs)
            ref_norms = row_norms(refs) if check_ref_norms else None
    check_values(sim, norms, ref_norms, self_index)
    rows = torch.arange(embeddings.shape[0], device=embeddings.device)
    if in_batch:
        cols, valid = rows, torch.ones_like(rows, dtype=torch.bool)
    elif self_index is not None:
        cols, valid = self_index.clamp(min=0), self_index >= 0
    else:
        rows = cols = rows[:0]
        valid = torch.ones_like(rows, dtype=torch.bool)
    return Pairs(sim, labels, ref_labels, in_batch, embeddings.shape[1], rows, cols, valid)


class PairLoss(torch.nn.Module):
    """Base of every pair-based loss: one call signature, input checks, active count.

    Subclasses implement ``compute(pairs) -> (loss, num_active)``. After each call
    ``num_active`` holds the number of items the loss was averaged over (a detached 0-d
    tensor, so reading it costs nothing until it is logged) and ``active_unit`` names them.
    """

    active_unit = "pairs"

    def __init__(self) -> None:
        super().__init__()
        self.num_active = torch.zeros((), dtype=torch.long)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        self_index: Tensor | None = None,
        *,
        check_ref_norms: bool = True,
    ) -> Tensor:
        """embeddings (B, d) L2-normalised, labels (B,); optional references (M, d)
        L2-normalised, (M,), and self_index (B,) (reference slot of each anchor's own copy,
        -1 = none). Returns a scalar loss (float32, or float64 for float64 input).
        Raises ValueError for malformed inputs, NaN or inf, or rows that are not unit vectors
        (see :func:`build_pairs`, which also explains ``check_ref_norms``)."""
        pairs = build_pairs(
            embeddings, labels, ref_emb, ref_labels, self_index, check_ref_norms=check_ref_norms
        )
        loss, num_active = self.compute(pairs)
        self.num_active = num_active.detach()
        return loss

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
