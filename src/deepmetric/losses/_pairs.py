"""Pair machinery shared by every pair-based loss.

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
import torch.nn.functional as F
from torch import Tensor


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


def check_shapes(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    self_index: Tensor | None,
) -> None:
    """Raise ValueError with a clear message for malformed loss inputs (shapes, dtypes)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, d), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (B,) with B = {embeddings.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    if ref_emb is not None:
        if ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb must be (M, {embeddings.shape[1]}), got shape {tuple(ref_emb.shape)}"
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


def check_values(sim: Tensor, self_index: Tensor | None, embeddings: Tensor) -> None:
    """One host sync per call: NaN/inf anywhere in the inputs shows up in the (B, M)
    similarities; self_index must lie in [-1, M)."""
    total = sim.detach().sum()
    if self_index is None:
        if math.isfinite(float(total)):
            return
    else:
        out_of_range = (self_index < -1) | (self_index >= sim.shape[1])
        if not (~torch.isfinite(total) | out_of_range).any():
            return
        if out_of_range.any():
            raise ValueError(f"self_index must lie in [-1, {sim.shape[1]}) (-1 = no own copy)")
    which = "embeddings" if not torch.isfinite(embeddings).all() else "ref_emb"
    raise ValueError(f"{which} contain NaN or inf (check the model output / learning rate)")


def build_pairs(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
) -> Pairs:
    """Similarity matrix and positive/negative masks, self-pairs excluded by index.

    embeddings: (B, d) L2-normalised anchors; labels: (B,) integer class ids.
    ref_emb, ref_labels: (M, d), (M,) reference set; None = the batch itself.
    self_index: (B,) long, the reference slot holding anchor i's own copy, -1 for none.
    """
    check_shapes(embeddings, labels, ref_emb, ref_labels, self_index)
    dtype = torch.promote_types(embeddings.dtype, torch.float32)  # float32, or float64 in tests
    in_batch = ref_emb is None
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if in_batch:
            sim = _Gram.apply(embeddings.to(dtype))
            ref_labels = labels
        else:
            sim = _CrossSim.apply(embeddings.to(dtype), ref_emb.to(dtype))
    check_values(sim, self_index, embeddings)
    rows = torch.arange(embeddings.shape[0], device=embeddings.device)
    if in_batch:
        cols, valid = rows, torch.ones_like(rows, dtype=torch.bool)
    elif self_index is not None:
        cols, valid = self_index.clamp(min=0), self_index >= 0
    else:
        rows = cols = rows[:0]
        valid = torch.ones_like(rows, dtype=torch.bool)
    return Pairs(sim, labels, ref_labels, in_batch, embeddings.shape[1], rows, cols, valid)


# From this many rows the Gram matrix is computed as 3 of its 4 blocks (measured on the CPU:
# 6.5 -> 5.0 ms at B = 1024, d = 512; no gain at B = 256).
SYMMETRIC_GRAM_MIN_ROWS = 512


class _Gram(torch.autograd.Function):
    """x @ x.T whose backward is one matmul, (G + G.T) @ x, instead of autograd's two."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        if x.shape[0] < SYMMETRIC_GRAM_MIN_ROWS:
            return x @ x.T
        # S is symmetric: the two diagonal blocks and one off-diagonal block, 3/4 of the work
        half = x.shape[0] // 2
        top, bottom = x[:half], x[half:]
        sim = torch.empty(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
        torch.mm(top, top.T, out=sim[:half, :half])
        torch.mm(bottom, bottom.T, out=sim[half:, half:])
        torch.mm(top, bottom.T, out=sim[:half, half:])
        sim[half:, :half] = sim[:half, half:].T
        return sim

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # G^T copied contiguously, then G added: on the CPU 2x faster than G + G.T, whose
        # strided read of the transpose costs as much as the matmul at B = 1024
        return _grad_matmul(grad.T.contiguous().add_(grad), x)


# Below this fraction of non-zero entries, a CPU gradient matrix of at least
# SPARSE_GRAD_MIN_SIZE entries is multiplied as sparse (smaller ones are cheap dense).
SPARSE_GRAD_DENSITY = 0.01
SPARSE_GRAD_MIN_SIZE = 2**18
# Rows of the gradient looked at first (every SPARSE_SAMPLE_STEP-th): only a sample under
# twice the density threshold leads to the full count.
SPARSE_SAMPLE_STEP = 16


def _grad_matmul(grad: Tensor, x: Tensor) -> Tensor:
    """grad (B, M) @ x (M, d). On the CPU, hinge losses against a large reference set
    (contrastive, triplet and margin with a cross-batch memory) leave most entries of grad at
    exactly 0: below ``SPARSE_GRAD_DENSITY`` the product is taken over the non-zeros only
    (one counting pass; GPUs keep the dense matmul, which needs no host sync)."""
    if grad.device.type == "cpu" and grad.dim() == 2 and grad.numel() >= SPARSE_GRAD_MIN_SIZE:
        sample = grad[::SPARSE_SAMPLE_STEP]  # dense gradients (NCA, MS) exit after 1/16
        if int(torch.count_nonzero(sample)) < SPARSE_GRAD_DENSITY * sample.numel() * 2:
            if int(torch.count_nonzero(grad)) < SPARSE_GRAD_DENSITY * grad.numel():
                return torch.sparse.mm(grad.to_sparse(), x)
    return grad @ x


class _CrossSim(torch.autograd.Function):
    """anchors (B, d) @ refs.T (M, d) -> (B, M), backward through :func:`_grad_matmul`."""

    @staticmethod
    def forward(ctx, anchors: Tensor, refs: Tensor) -> Tensor:
        ctx.save_for_backward(anchors, refs)
        return anchors @ refs.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        anchors, refs = ctx.saved_tensors
        grad_anchors = _grad_matmul(grad, refs) if ctx.needs_input_grad[0] else None
        grad_refs = _grad_matmul(grad.T, anchors) if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_refs


def exp_nonpositive_(x: Tensor) -> Tensor:
    """In place e^x for x <= 0 (exponents already shifted by their maximum), clamped at -80:
    e^-80 ~ 2e-35 of the largest term, no change in float32, while torch.exp on the CPU is
    ~10x slower on far-negative or -inf input (masked entries)."""
    return x.clamp_(min=-80.0).exp_()


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1, include_zero: bool = False) -> Tensor:
    """log(sum_{mask} e^x) along ``dim``; with ``include_zero`` log(1 + sum_{mask} e^x).

    Shifted by the (detached) masked maximum and exponentiated by :func:`exp_nonpositive_`
    (torch.logsumexp is as slow as torch.exp on masked entries); masked terms are zeroed
    after the exp. A slice with no
    True entry gives about -1e30 (0 with ``include_zero``) and zero gradient: callers mark such
    slices invalid. The gradient is exactly the masked softmax.
    """
    lse = _MaskedLogSumExp.apply(x, mask, dim)
    return F.softplus(lse) if include_zero else lse


class _MaskedLogSumExp(torch.autograd.Function):
    """Forward in one reused (B, M) buffer, which then holds the masked softmax: the only
    tensor kept for backward (autograd's graph of the same ops keeps four)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, dim: int) -> Tensor:
        off = ~mask
        buf = x.detach().masked_fill(off, -1e30)
        shift = buf.amax(dim, keepdim=True)
        exp_nonpositive_(buf.sub_(shift)).masked_fill_(off, 0.0)
        total = buf.sum(dim, keepdim=True).clamp_(min=1e-30)
        ctx.save_for_backward(buf.div_(total))
        ctx.dim = dim
        return (total.log_() + shift).squeeze(dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (softmax,) = ctx.saved_tensors
        return softmax * grad.unsqueeze(ctx.dim), None, None


class _WithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim: Tensor, value: Tensor, grad_sim: Tensor) -> Tensor:
        ctx.save_for_backward(grad_sim)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (grad_sim,) = ctx.saved_tensors
        if grad.device.type == "cpu" and grad.numel() == 1 and float(grad) == 1.0:
            return grad_sim, None, None  # loss.backward(): skip a (B, M) multiply by 1
        return grad_sim * grad, None, None


def with_gradient(sim: Tensor, value: Tensor, grad_sim: Tensor) -> Tensor:
    """The scalar ``value`` made differentiable in ``sim`` (B, M) with d value / d sim =
    ``grad_sim`` (B, M), both computed by the caller without autograd.

    For losses that are a sum of simple terms of each similarity, writing the derivative down
    costs a few full-matrix passes where autograd's graph costs several times more.
    """
    return _WithGradient.apply(sim, value, grad_sim)


def zero_loss(embeddings: Tensor) -> Tensor:
    """A zero that keeps the graph: backward gives zero gradients, never NaN."""
    return embeddings.sum() * 0.0


def masked_mean(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over ``valid`` entries and their count; zero with a graph if none."""
    count = valid.sum()
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1), count


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
    ) -> Tensor:
        """embeddings (B, d) L2-normalised, labels (B,); optional references (M, d), (M,)
        and self_index (B,) (reference slot of each anchor's own copy, -1 = none).
        Returns a scalar loss (float32, or float64 for float64 input)."""
        pairs = build_pairs(embeddings, labels, ref_emb, ref_labels, self_index)
        loss, num_active = self.compute(pairs)
        self.num_active = num_active.detach()
        return loss

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
