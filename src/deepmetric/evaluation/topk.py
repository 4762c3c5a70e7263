"""Exact top-k of score lines under the tie rule: score descending, then position ascending.

``torch.topk`` leaves both the order and the choice among equal values unspecified; these
functions make them exact. Every search path (torch chunks, symmetric self-search, faiss
candidates) orders its lists with them.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Two-level top-k: a line of n scores is cut into n // GROUP_SLOTS interleaved groups
# (positions t, t + w, t + 2w, ... for w groups); see topk_candidates.
GROUP_SLOTS = 16


def order_ties(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of a candidate list by (value descending, index ascending).

    values: (c, m) float; indices: (c, m) int64. Returns both re-ordered.

    >>> order_ties(torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[0, 7, 3]]))
    (tensor([[2., 2., 1.]]), tensor([[3, 7, 0]]))
    """
    indices, perm = torch.sort(indices, dim=1)
    values = values.gather(1, perm)
    values, perm = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


def merge_topk(
    values: Tensor, indices: Tensor, new_values: Tensor, new_indices: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge two exact top lists of the same rows (disjoint items); keep the best k."""
    v, i = order_ties(torch.cat([values, new_values], 1), torch.cat([indices, new_indices], 1))
    return v[:, :k], i[:, :k]


def topk_candidates(scores: Tensor, m: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """m entries of each line of ``scores`` (rows for dim=1, columns for dim=0) holding its top
    m, unordered: values (lines, m) and positions in the line (lines, m) int64.

    Each line is cut into interleaved groups of ``GROUP_SLOTS`` entries (position p is in group
    p mod w, w = n // GROUP_SLOTS; the last n mod GROUP_SLOTS positions are always candidates).
    The top m entries lie in the m groups with the largest maxima, unless the m-th and
    (m+1)-th values of the line are equal, which the caller's tie check detects either way (it
    then sees equal m-1-th and m-th candidate values). Group maxima are one elementwise max
    over GROUP_SLOTS slabs, so ``torch.topk``, slow on the CPU, only sees about
    m * GROUP_SLOTS + n / GROUP_SLOTS entries per line instead of n (the gain is measured in
    benchmarks/RESULTS.md, "Retrieval evaluation"). For dim=0 no transposed copy is made.
    """
    lines = scores if dim == 1 else scores.T
    num_lines, length = lines.shape
    width = length // GROUP_SLOTS
    if width < 4 * m or not scores.is_contiguous():
        return torch.topk(lines, m, dim=1, sorted=False)
    grouped = GROUP_SLOTS * width
    if dim == 1:
        slabs = scores.as_strided((num_lines, GROUP_SLOTS, width), (length, width, 1))
        maxima = slabs.amax(1)
    else:
        maxima = scores[:grouped].view(GROUP_SLOTS, width, num_lines).amax(0).T.contiguous()
    groups = torch.topk(maxima, m, dim=1, sorted=False).indices  # (lines, m)
    slots = width * torch.arange(GROUP_SLOTS, device=scores.device)
    positions = (groups[:, :, None] + slots).flatten(1)  # (lines, m * GROUP_SLOTS)
    if grouped < length:
        tail = torch.arange(grouped, length, device=scores.device).expand(num_lines, -1)
        positions = torch.cat([positions, tail], 1)
    values, pick = torch.topk(lines.gather(1, positions), m, dim=1, sorted=False)
    return values, positions.gather(1, pick)


def topk_exact(scores: Tensor, k: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row (dim=1) or each column (dim=0) of ``scores`` under the tie
    rule; returns (lines, k) values and positions.

    k + 1 candidates are taken (:func:`topk_candidates`): where the k-th and (k+1)-th values
    differ, the first k are the exact set and only need ordering. Where they are equal (a tie
    across the cut, value t), the list is the candidates above t followed by the lowest
    positions holding t, found in one pass over those lines, a quarter of the lines at a time.

    >>> topk_exact(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), 3)
    (tensor([[0.9000, 0.5000, 0.5000]]), tensor([[1, 0, 2]]))
    """
    lines = scores if dim == 1 else scores.T
    num_lines, length = lines.shape
    if k >= length:
        values, indices = torch.sort(lines, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    values, indices = topk_candidates(scores, k + 1, dim)
    values, indices = order_ties(values, indices)
    tied = (values[:, k - 1] == values[:, k]).nonzero().flatten()
    step = max(1, num_lines // 4)
    for start in range(0, tied.numel(), step):
        rows = tied[start : start + step]
        cut = values[rows, k - 1 : k]  # (r, 1) the tied value t
        above = values[rows] > cut  # at most k - 1 candidates per row
        positions = torch.arange(length, device=scores.device)
        equal = torch.where(lines[rows] == cut, positions, length)  # (r, n)
        first_equal = torch.topk(equal, k, dim=1, largest=False).values  # lowest positions
        merged_values = torch.cat(
            [values[rows].masked_fill(~above, float("-inf")), cut.expand(-1, k)], 1
        )
        merged_indices = torch.cat([indices[rows].masked_fill(~above, length), first_equal], 1)
        merged_values, merged_indices = order_ties(merged_values, merged_indices)
        values[rows, :k] = merged_values[:, :k]
        indices[rows, :k] = merged_indices[:, :k]
    return values[:, :k].contiguous(), indices[:, :k].contiguous()
