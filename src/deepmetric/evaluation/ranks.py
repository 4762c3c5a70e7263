"""First-positive ranks: where each query's same-label gallery items are, the rank of the
first one in a ranked list, or by counting over a whole row of scores when it is beyond.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import even_ranges, exact_float32, mask_self, scores_into


@dataclass(frozen=True)
class SameLabel:
    """Where each query's same-label gallery items are, without a Q x G mask.

    ``order[start[i] : start[i] + count[i]]`` lists query i's same-label gallery indices in
    ascending order (``order`` is the gallery stably sorted by label); ``num_relevant[i]`` is
    R_i, their number without the query's own copy (``self_index``).
    """

    order: Tensor  # (G,) int64
    start: Tensor  # (Q,) int64
    count: Tensor  # (Q,) int64
    num_relevant: Tensor  # (Q,) int64

    @classmethod
    def build(
        cls, query_labels: Tensor, gallery_labels: Tensor, self_index: Tensor | None
    ) -> SameLabel:
        sorted_labels, order = torch.sort(gallery_labels, stable=True)
        unique, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.searchsorted(unique, query_labels).clamp(max=unique.numel() - 1)
        found = unique[slot] == query_labels
        start, count = torch.where(found, starts[slot], 0), torch.where(found, counts[slot], 0)
        relevant = count
        if self_index is not None:
            own = self_index >= 0
            own_same = own & (gallery_labels[self_index.clamp(min=0)] == query_labels)
            relevant = count - own_same.to(torch.int64)
        return cls(order, start, count, relevant)

    def rows(self, index: Tensor | slice) -> SameLabel:
        """The same structure for a subset of the queries."""
        return SameLabel(self.order, self.start[index], self.count[index], self.num_relevant[index])


def first_positive_in_lists(
    indices: Tensor, query_labels: Tensor, gallery_labels: Tensor
) -> Tensor:
    """Rank of each row's first same-label item in its list, L when there is none.

    indices: (c, L) ranked gallery indices (-1 = no item); query_labels: (c,).
    """
    positive = (gallery_labels[indices.clamp(min=0)] == query_labels[:, None]) & (indices >= 0)
    found = positive.any(dim=1)
    return torch.where(found, positive.to(torch.uint8).argmax(dim=1), indices.shape[1])


def count_first_positive(scores: Tensor, same_label: SameLabel, scratch: Tensor) -> Tensor:
    """Rank of each row's first same-label item, by counting over its whole row of scores.

    scores: (r, G) scores of r queries against the whole gallery, each row's own item already
    -inf; ``same_label`` describes those r queries, each of which has R_i >= 1; scratch: a
    flat float32 buffer of at least r * G entries, reused by the caller.
    rank = #{j: s_j > s*} + #{j < j*: s_j = s*}, where s*, j* is the best positive (highest
    score, then lowest index) read from the same scores: no positive scores above s*, and
    positives equal to s* have indices >= j*, so both terms count negatives only.
    """
    num_gallery = scores.shape[1]
    count, start = same_label.count, same_label.start
    offsets = torch.arange(int(count.max()), device=scores.device)
    valid = offsets[None, :] < count[:, None]
    pos_index = same_label.order[(start[:, None] + offsets).clamp(max=num_gallery - 1)]
    pos_scores = scores.gather(1, pos_index).masked_fill_(~valid, float("-inf"))
    best_score = pos_scores.max(dim=1, keepdim=True).values
    is_best = (pos_scores == best_score) & valid
    best_index = pos_index.gather(1, is_best.to(torch.uint8).argmax(dim=1, keepdim=True))
    # sign(s_j - s*) is 1 above, 0 equal, -1 below: with sums A = sum sign and B = sum |sign|,
    # #above = (A + B) / 2 and #equal = width - B. Float sums of +-1, exact below 2^24 columns,
    # cost fewer passes than summing bool masks (benchmarks/RESULTS.md, "Retrieval evaluation").
    rank = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    equal = torch.zeros_like(rank)
    for cols in even_ranges(num_gallery, 2**23):
        block = scores[:, cols.start : cols.stop]
        sign = scratch[: block.numel()].view(block.shape)
        torch.sub(block, best_score, out=sign).sign_()
        total = sign.sum(dim=1)
        nonzero = sign.abs_().sum(dim=1)
        rank += ((total + nonzero) / 2).to(torch.int64)
        equal += len(cols) - nonzero.to(torch.int64)
    tied = (equal > is_best.sum(dim=1)).nonzero().flatten()  # rare: duplicates, quantised data
    if tied.numel() > 0:
        before = torch.arange(num_gallery, device=scores.device) < best_index[tied]
        rank[tied] += ((scores[tied] == best_score[tied]) & before).sum(dim=1)
    return rank


def count_in_chunk(scores: Tensor, rows: Tensor | None, same_label: SameLabel) -> Tensor:
    """:func:`count_first_positive` for ``rows`` (r,) of a chunk's scores (c, G), or all c
    rows for None, a quarter of the chunk at a time (row copies and signs in two buffers
    reused throughout). ``same_label`` describes the c rows. Returns (r,) int64."""
    num_rows, num_gallery = scores.shape
    count = num_rows if rows is None else rows.numel()
    step = min(count, max(1, num_rows // 4))
    scratch = torch.empty(step * num_gallery, device=scores.device)
    picked = None if rows is None else torch.empty_like(scratch)
    ranks = torch.empty(count, dtype=torch.int64, device=scores.device)
    for s0 in range(0, count, step):
        part = slice(s0, s0 + step)
        if rows is None:
            chunk, chunk_same = scores[part], same_label.rows(part)
        else:
            some = rows[part]
            chunk = picked[: some.numel() * num_gallery].view(some.numel(), num_gallery)
            torch.index_select(scores, 0, some, out=chunk)
            chunk_same = same_label.rows(some)
        ranks[part] = count_first_positive(chunk, chunk_same, scratch)
    return ranks


def count_rows(
    query: Tensor, gallery: Tensor, self_index: Tensor | None, same_label: SameLabel, chunk: int
) -> Tensor:
    """First-positive rank of every query (Q, d) by counting on its whole row of scores
    against ``gallery`` (G, d), recomputed ``chunk`` rows at a time. Returns (Q,) int64."""
    ranks = torch.empty(query.shape[0], dtype=torch.int64, device=query.device)
    buffer = torch.empty(min(chunk, query.shape[0]) * gallery.shape[0], device=query.device)
    with exact_float32(query.device):
        for rows in even_ranges(query.shape[0], chunk):
            part = slice(rows.start, rows.stop)
            scores = scores_into(query[part], gallery, buffer)
            mask_self(scores, None if self_index is None else self_index[part], 0)
            ranks[part] = count_in_chunk(scores, None, same_label.rows(part))
    return ranks
