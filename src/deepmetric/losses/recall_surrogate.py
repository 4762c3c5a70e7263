"""Recall@k surrogate loss, RS@k, and similarity mixup, SiMix (Patel, Tolias, Matas, "Recall@k
Surrogate Loss with Large Batches and Similarity Mixup", CVPR 2022; official code
github.com/yash0307/RecallatK_surrogate, MIT, read at ed05202: src/losses.py, src/mixup.py).

Depends on torch and the shared pair machinery of ``pairs`` (RS@k is a pair loss: everything
it reads is the (B, M) similarity matrix and the label masks, so it is a :class:`PairLoss`
with the common call and checks; SiMix is done on that matrix, in :meth:`forward`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._autograd import with_gradient
from .pairs import PairLoss, Pairs, build_pairs

# Elements of one (queries x positives x references) block of the rank computation: two such
# float buffers are alive at a time (64 MiB each in float32).
RANK_CHUNK_ELEMENTS = 2**24

SIMIX_WITH_REFERENCES = (
    "simix=True cannot be used with a reference set (ref_emb: a cross-batch memory or a "
    "gathered batch): SiMix adds virtual samples to the set every query is ranked against, "
    "and a reference set is ranked as given, holds no virtual samples and its self_index "
    "names slots of the B real anchors only; mixing the references would mix stale memory "
    "rows. Use simix in-batch (the paper's setting: one large batch, gradient caching via "
    "train.chunk_size, no memory; under torchrun the gathered global batch is in-batch) or "
    "set simix=False"
)


class SimixDraw(NamedTuple):
    """The virtual samples of one SiMix call: v = alpha x_first + (1 - alpha) x_second.

    first, second: (V,) int64 rows of the batch, first < second, same label; every unordered
        pair of same-label rows once, in row-major order of (first, second).
    alpha: (V,) float64 mixing weights, U(0, 1), one per pair.
    """

    first: Tensor
    second: Tensor
    alpha: Tensor


def simix_draw(labels: Tensor, generator: torch.Generator) -> SimixDraw:
    """Every unordered pair of same-label rows of ``labels`` (B,) with its weight alpha ~ U(0, 1),
    drawn on the CPU from ``generator`` (so that a seed gives the same draws on every device and
    every rank). A P x K batch gives P * K (K - 1) / 2 pairs; a singleton class gives none."""
    same = labels[:, None] == labels[None, :]
    first, second = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    alpha = torch.rand(first.numel(), generator=generator, dtype=torch.float64)
    return SimixDraw(first, second, alpha.to(labels.device))


def mix_rows(x: Tensor, draw: SimixDraw, dim: int = 0) -> Tensor:
    """x with one virtual slice per pair of ``draw`` appended along ``dim``:
    alpha x[first] + (1 - alpha) x[second] (no re-normalisation).

    On embeddings (B, d) -> (B + V, d) this is SiMix's batch; applied to the similarity
    matrix along both dimensions, S (B, B) -> (B + V, B + V), it gives the similarities of that
    batch exactly, by bilinearity: <q, v> = alpha S_q,first + (1 - alpha) S_q,second.
    """
    shape = [1] * x.dim()
    shape[dim] = -1
    alpha = draw.alpha.to(x.dtype).view(shape)
    virtual = alpha * x.index_select(dim, draw.first) + (1 - alpha) * x.index_select(
        dim, draw.second
    )
    return torch.cat([x, virtual], dim)


class RecallSurrogateLoss(PairLoss):
    """Recall@k surrogate (RS@k): one minus a smooth Recall@k of each query, averaged over k.

    Query q is a row of S (B, M); its positives P_q are the same-label references other than
    its own slot; Omega_q is every reference but its own slot. With sigma(x) = 1 / (1 + e^-x):

        r(q, p) = 1 + sum_{j in Omega_q, j != p} sigma((S_qj - S_qp) / tau2)      smooth rank
                    [+ sigma((s_qq - S_qp) / tau2)       with count_query_in_rank]
        R_k(q)  = min(sum_{p in P_q} sigma((k - r(q, p)) / tau1), k) / min(k, |P_q|)
        L       = mean over queries with |P_q| > 0 of  1 - mean_k R_k(q)

    Queries without a positive contribute nothing and are not counted (``num_active`` =
    queries); a batch without any returns a zero with a graph (gradient 0). Each k is capped
    at M, the number of references (in-batch: B, the official code's cap). Defaults are the
    paper's: k in (1, 2, 4, 8, 16), tau2 (``rank_temperature``) 0.01, tau1
    (``k_temperature``) 1. torch.sigmoid is evaluated stably for any argument; the official
    code clamps the exponent to [-50, 50], which changes sigma by less than 2e-22.

    ``count_query_in_rank``: the paper's Omega is the batch without the query (default,
    False); the official code ranks against the whole batch, the query included, which adds
    sigma((s_qq - S_qp) / tau2) ~ 1 to every rank (REFERENCE-3 10.1: sims q.p = .9, .5, .2,
    q.n = .7, .1, 0, -.1 give ranks 1, 3, 4 without the query and 2, 4, 5 with it). True
    reproduces the code. s_qq is the query's similarity with itself: in-batch the diagonal of
    S (<q, q>, as the code: 1 for a unit row, below 1 for a SiMix virtual row); with references
    1 (a unit vector; the reference set need not hold the query).

    ``clip``: the min(., k) of R_k is in the official code; the paper's formula as recalled has
    none (REFERENCE-3 10.1, unverified). With hard ranks the sum cannot exceed k, but smooth
    ranks of tied positives (r ~ (|P| + 1) / 2 each) can push it past k when |P_q| > k (SiMix,
    K' = 10, or large classes), so R_k > 1 and the loss < 0. The default (True) keeps R_k <= 1
    and the loss in [0, 1]; False gives the unclipped sum. Clipped (q, k) pass no gradient.

    ``simix`` (similarity mixup, official src/mixup.py): every unordered pair (a, b) of
    same-label rows of the batch adds a virtual sample v = alpha x_a + (1 - alpha) x_b,
    alpha ~ U(0, 1) per pair from this module's generator (seeded by ``seed``, on the CPU,
    saved in ``state_dict()``; every rank draws the same values), not re-normalised. Virtual
    samples are positives of their class and queries too: a P x K batch becomes
    P (K + K (K - 1) / 2) rows. The mixing is done on S (:func:`mix_rows` on both dimensions),
    which equals the similarities of the mixed embeddings. No reference set with simix (see
    ``SIMIX_WITH_REFERENCES``).

    Computation: the value and its derivative in S are written down (``with_gradient``), the
    ranks block by block of queries: a block of Q queries holds two (Q, C, M) float buffers,
    C = the largest class among the references, Q = max(1, RANK_CHUNK_ELEMENTS // (C M)), so
    memory is O(B M) for S and dL/dS plus 2 x 2^24 elements (128 MiB float32) whatever B
    (B = M = 4,000, K = 4: S and dL/dS 2 x 61 MiB, blocks of 1,048 queries, measured peak
    +418 MiB on the CPU for forward and backward; with SiMix, B' = 10,000, C = 10: 2 x 381 MiB,
    blocks of 167 queries, +1.1 GiB). Derivative (checked against autograd through the float64
    oracle in tests/test_losses_recall_surrogate.py::test_matches_reference):

        w_qk = dL/dh_qpk = -[q valid] / (#valid * n_k * min(k, |P_q|)) * [sum_p h_qpk <= k]
        g_qp = dL/dr_qp  = -sum_k w_qk h_qpk (1 - h_qpk) / tau1          (p in P_q)
        dL/dS_qj += sum_p g_qp sigma'_qpj / tau2                         (j in Omega_q, j != p)
        dL/dS_qp -= g_qp sum_j sigma'_qpj / tau2   (and the s_qq term likewise, in-batch to S_qq)

    with sigma'(x) = sigma(x) sigma(-x), h_qpk = sigma((k - r_qp) / tau1).
    """

    active_unit = "queries"

    def __init__(
        self,
        k_values: tuple[int, ...] = (1, 2, 4, 8, 16),
        rank_temperature: float = 0.01,
        k_temperature: float = 1.0,
        count_query_in_rank: bool = False,
        clip: bool = True,
        simix: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        k_values = tuple(k_values)
        if not k_values or any(int(k) != k or k < 1 for k in k_values):
            raise ValueError(f"k_values must be integers >= 1, got {list(k_values)}")
        if rank_temperature <= 0:
            raise ValueError(f"rank_temperature must be > 0, got {rank_temperature}")
        if k_temperature <= 0:
            raise ValueError(f"k_temperature must be > 0, got {k_temperature}")
        self.k_values = tuple(int(k) for k in k_values)
        self.rank_temperature = float(rank_temperature)
        self.k_temperature = float(k_temperature)
        self.count_query_in_rank = bool(count_query_in_rank)
        self.clip = bool(clip)
        self.simix = bool(simix)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def get_extra_state(self) -> dict:
        """The SiMix generator's state, kept in ``state_dict()`` so a resumed run draws the
        same weights."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the generator saved by :meth:`get_extra_state`."""
        self.generator.set_state(state["generator"])

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
        """The common call (see :meth:`PairLoss.forward`); with ``simix`` the batch's
        similarities are extended by the virtual samples first. Raises ValueError for simix
        with a reference set."""
        if not self.simix:
            return super().forward(
                embeddings,
                labels,
                ref_emb,
                ref_labels,
                self_index,
                check_ref_norms=check_ref_norms,
            )
        if ref_emb is not None:
            raise ValueError(SIMIX_WITH_REFERENCES)
        pairs = build_pairs(embeddings, labels, self_index=self_index)  # checks the real rows
        draw = simix_draw(labels, self.generator)
        sim = mix_rows(mix_rows(pairs.sim, draw, 0), draw, 1)  # (B + V, B + V)
        mixed_labels = torch.cat([labels, labels[draw.first]])
        rows = torch.arange(len(mixed_labels), device=labels.device)  # own slots: the diagonal
        own = torch.ones_like(rows, dtype=torch.bool)
        mixed = Pairs(sim, mixed_labels, mixed_labels, True, pairs.dim, rows, rows, own)
        loss, num_active = self.compute(mixed)
        self.num_active = num_active.detach()
        return loss

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        sim = pairs.sim
        b, m = sim.shape
        tau1, tau2 = self.k_temperature, self.rank_temperature
        with torch.no_grad():
            index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C)
            width = index.shape[1]
            own = torch.full((b,), -1, dtype=torch.long, device=sim.device)  # own slot, -1: none
            own[pairs.self_rows] = torch.where(pairs.self_valid, pairs.self_cols, -1)
            if pairs.in_batch:
                self_sim = sim.diagonal()
            else:
                self_sim = torch.ones(b, dtype=sim.dtype, device=sim.device)
            ks = torch.tensor([min(k, m) for k in self.k_values], dtype=sim.dtype).to(sim.device)
            num_pos = is_pos.sum(1)
            valid = num_pos > 0
            count = valid.sum()
            norm = torch.minimum(ks, num_pos[:, None].to(sim.dtype)).clamp_(min=1)  # (B, nk)
            weight = valid.to(sim.dtype) / count.clamp(min=1)  # (B,) mean over valid queries
            w = -weight[:, None] / (len(ks) * norm)  # (B, nk) dL/dh of an unclipped (q, k)

            value = sim.new_zeros(())
            grad = torch.zeros_like(sim)
            step = max(1, RANK_CHUNK_ELEMENTS // (width * m))
            for start in range(0, b, step):
                rows = slice(start, start + step)
                s, idx, pos = sim[rows], index[rows], is_pos[rows]
                s_pos = s.gather(1, idx)  # (Q, C)
                # sigma((S_qj - S_qp) / tau2) over Omega_q minus p: (Q, C, M)
                z = (s[:, None, :] - s_pos[:, :, None]).div_(tau2)
                sig = torch.sigmoid(z)
                own_q = own[rows]
                omega = torch.ones_like(s).scatter_(
                    1, own_q.clamp(min=0)[:, None], (own_q < 0)[:, None].to(s.dtype)
                )
                sig.mul_(omega[:, None, :]).scatter_(2, idx[:, :, None], 0.0)
                rank = sig.sum(2).add_(1.0)  # (Q, C)
                if self.count_query_in_rank:
                    query = torch.sigmoid((self_sim[rows, None] - s_pos) / tau2)
                    rank += query
                h = torch.sigmoid((ks - rank[:, :, None]) / tau1)  # (Q, C, nk)
                total = (h * pos[:, :, None]).sum(1)  # (Q, nk)
                w_q = w[rows]
                if self.clip:
                    w_q = w_q * (total <= ks)
                    total = torch.minimum(total, ks)
                value += ((1 - (total / norm[rows]).mean(1)) * weight[rows]).sum()
                # g = dL/dr (Q, C) on the positives; 0 on padding
                g = -(w_q[:, None, :] * h * (1 - h)).sum(2).div_(tau1).mul_(pos)
                # sigma'(z) = sigma(z) sigma(-z), in z's buffer; 0 where sig was masked
                d_rank = z.neg_().sigmoid_().mul_(sig).mul_(g[:, :, None] / tau2)  # dL/dS_qj
                grad_rows = grad[rows]  # a view: written in place
                grad_rows += d_rank.sum(1)
                grad_rows.scatter_add_(1, idx, -d_rank.sum(2))
                if self.count_query_in_rank:
                    d_query = query * (1 - query) * g / tau2  # (Q, C)
                    grad_rows.scatter_add_(1, idx, -d_query)
                    if pairs.in_batch:  # s_qq is S_qq, the diagonal
                        grad_rows.diagonal(start).add_(d_query.sum(1))
        return with_gradient(sim, value, grad), count
