"""Exact search with torch, in bounded memory: the ways :func:`~.neighbours.search` runs it.

Scores are float32 inner products ``query_rows @ gallery.T``; no function here holds a
Q x G matrix. Lists follow the tie rule (score descending, then gallery index ascending).

- :func:`search_rows`: chunks of query rows against the whole gallery. Each chunk's c x G
  scores give its top-k lists and, for the rows whose first same-label item is not in the
  list, that item's rank by counting on the same scores (:func:`count_first_positive`).
- :func:`search_self` / :func:`knn_self`: a set searched against itself. S = X X^T is
  symmetric, so only the blocks on and above the diagonal are multiplied, each reduced along
  its rows and its columns; ranks beyond the lists are counted on recomputed rows.
- :func:`knn_torch`: query chunks against gallery blocks of at most ``BLOCK_COLUMNS``,
  merged into running top lists, when no rank has to be counted (or whole rows do not fit).

Exact copies of a gallery vector must get equal scores (then the tie rule orders them by
index), but a BLAS may multiply narrow products with kernels that round by position. So
chunks and blocks are cut into nearly equal parts (:func:`even_ranges`: no sliver of a few
rows or columns multiplied apart from the rest), and products narrower than ``MIN_COLUMNS``
are padded (:func:`scores_into`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .topk import merge_topk, topk_exact

# Memory model turning a byte budget into chunk sizes.
# One score costs 4 B; counting, masks and sorts of tied lines work on at most a quarter of a
# chunk's rows at a time, which adds at most another 4 B per score.
SCORE_BYTES = 8
# One list entry being searched: float32 value + int64 index, about four copies while merging.
LIST_BYTES = 48
# One entry of a list kept for every item (knn_self): float32 value + int64 index.
KEPT_LIST_BYTES = 12
# Below this many query rows per chunk the gallery is cut into blocks (knn_torch).
MIN_QUERY_ROWS = 16
# knn_torch scores the gallery this many columns at a time, so that its query chunks can be
# large and each gallery block is read once per chunk (benchmarks/RESULTS.md, "Retrieval
# evaluation": 10,000 queries against 1,000,000 x 128).
BLOCK_COLUMNS = 8192
# Products with fewer gallery columns are padded to this many (scores_into).
MIN_COLUMNS = 128
# knn_self: square blocks of at most SELF_BLOCK rows, and at least MIN_SELF_BLOCK rows (below
# that search_rows is used instead).
SELF_BLOCK = 4096
MIN_SELF_BLOCK = 256


# --------------------------------------------------------------------------------------------
# planning and small helpers


def even_ranges(n: int, max_size: int) -> list[range]:
    """range(n) cut into the fewest consecutive ranges of at most ``max_size``, all of one
    size but the last, and the last no sliver (at least half the others). The size is a
    multiple of 256, or else of 16, where that allows: the BLAS multiplies such widths, and
    the two-level top-k reduces them, faster (benchmarks/RESULTS.md, "Retrieval evaluation").

    >>> even_ranges(100, 30)
    [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]
    >>> even_ranges(1000, 400)
    [range(0, 336), range(336, 672), range(672, 1000)]
    """
    parts = -(-n // max(1, max_size))
    size = -(-n // parts)
    for align in (256, 16):
        aligned = -(-size // align) * align
        if aligned <= max_size and n - aligned * (parts - 1) >= aligned // 2:
            size = aligned
            break
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def plan_chunks(
    num_query: int, num_gallery: int, list_size: int, budget: int, extra_row_bytes: int = 0
) -> tuple[int, int]:
    """Chunk sizes ``(query_rows, gallery_cols)`` whose working memory stays within ``budget``.

    A chunk of c query rows against g gallery columns costs about
    ``c * (SCORE_BYTES * g + 2 * LIST_BYTES * (list_size + 1) + extra_row_bytes)`` bytes.
    The whole gallery is used at once when that allows at least ``MIN_QUERY_ROWS`` rows (or all
    queries); otherwise at most ``MIN_QUERY_ROWS`` rows are taken and the gallery is cut into
    blocks. Raises ``ValueError`` when not even one row's lists fit.
    """
    if budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")
    list_row = 2 * LIST_BYTES * (list_size + 1) + extra_row_bytes
    rows = budget // (SCORE_BYTES * num_gallery + list_row)
    if rows >= min(num_query, MIN_QUERY_ROWS):
        return int(min(num_query, rows)), num_gallery
    rows = min(num_query, MIN_QUERY_ROWS, budget // (list_row + SCORE_BYTES))
    if rows < 1:
        raise ValueError(
            f"memory_budget_bytes={budget} is too small for lists of {list_size} neighbours; "
            f"need at least {list_row + SCORE_BYTES} bytes"
        )
    cols = (budget // rows - list_row) // SCORE_BYTES
    return int(rows), int(min(cols, num_gallery))


def plan_blocks(num_query: int, num_gallery: int, list_size: int, budget: int) -> tuple[int, int]:
    """Chunk sizes ``(query_rows, gallery_cols)`` for :func:`knn_torch`: planned as if the
    gallery were ``BLOCK_COLUMNS`` wide (it is scored one block at a time), narrower blocks
    when not even ``MIN_QUERY_ROWS`` rows fit."""
    width = min(num_gallery, BLOCK_COLUMNS)
    return plan_chunks(num_query, width, list_size, budget)


def plan_self_block(num_items: int, k: int, budget: int) -> int:
    """Block size for :func:`knn_self` within ``budget``, or 0 when it does not fit.

    Costs: the N x k lists of every item (``KEPT_LIST_BYTES`` per entry) plus, per block of
    b rows, b x b scores (``SCORE_BYTES`` per score) and the merge of b rows' lists
    (``2 * LIST_BYTES * (k + 1)`` per row).
    """
    rest = budget - KEPT_LIST_BYTES * num_items * k
    block = min(num_items, SELF_BLOCK)
    while block > 0 and block * (SCORE_BYTES * block + 2 * LIST_BYTES * (k + 1)) > rest:
        block = block * 3 // 4
    return block if block >= min(num_items, MIN_SELF_BLOCK) else 0


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, disable TF32 for the duration (exact float32 scores); restore the setting after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def scores_into(query: Tensor, gallery: Tensor, buffer: Tensor) -> Tensor:
    """``query (c, d) @ gallery (g, d).T`` written into the front of a flat reusable ``buffer``;
    returns the (c, g) view (reusing one buffer avoids page-faulting a fresh c x g block).

    A gallery of fewer than ``MIN_COLUMNS`` items is padded with zero rows: a BLAS multiplies
    such narrow products with kernels that can score two copies of one vector differently by
    their column (seen with MKL), which would break the tie rule.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    out = buffer[: num_query * num_gallery].view(num_query, num_gallery)
    if num_gallery >= MIN_COLUMNS:
        return torch.mm(query, gallery.T, out=out)
    padded = gallery.new_zeros(MIN_COLUMNS, gallery.shape[1])
    padded[:num_gallery] = gallery
    rows = max(1, num_query * num_gallery // MIN_COLUMNS)  # temporaries no larger than out
    for r0 in range(0, num_query, rows):
        out[r0 : r0 + rows] = torch.mm(query[r0 : r0 + rows], padded.T)[:, :num_gallery]
    return out


def mask_self(scores: Tensor, self_index: Tensor | None, col_offset: int) -> None:
    """Set ``scores[r, self_index[r] - col_offset] = -inf`` where that column lies in the block.

    scores: (c, g) block whose columns are gallery items ``col_offset .. col_offset + g - 1``;
    self_index: (c,) int64 gallery index of each row's own copy, -1 for none.
    """
    if self_index is None:
        return
    cols = self_index - col_offset
    rows = ((self_index >= 0) & (cols >= 0) & (cols < scores.shape[1])).nonzero().flatten()
    scores[rows, cols[rows]] = float("-inf")


# --------------------------------------------------------------------------------------------
# same-label items and first-positive ranks


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


def count_first_positive(scores: Tensor, same_label: SameLabel) -> Tensor:
    """Rank of each row's first same-label item, by counting over its whole row of scores.

    scores: (r, G) scores of r queries against the whole gallery, each row's own item already
    -inf; ``same_label`` describes those r queries, each of which has R_i >= 1.
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
        sign = (scores[:, cols.start : cols.stop] - best_score).sign_()
        total = sign.sum(dim=1)
        nonzero = sign.abs_().sum(dim=1)
        rank += ((total + nonzero) / 2).to(torch.int64)
        equal += len(cols) - nonzero.to(torch.int64)
    tied = (equal > is_best.sum(dim=1)).nonzero().flatten()  # rare: duplicates, quantised data
    if tied.numel() > 0:
        before = torch.arange(num_gallery, device=scores.device) < best_index[tied]
        rank[tied] += ((scores[tied] == best_score[tied]) & before).sum(dim=1)
    return rank


# --------------------------------------------------------------------------------------------
# the three searches


def search_rows(
    query: Tensor,
    gallery: Tensor,
    k: int,
    self_index: Tensor | None,
    query_chunk: int,
    labels: tuple[Tensor, Tensor, SameLabel] | None = None,
    rank_limit: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Top-k of query chunks of ``query_chunk`` rows against the whole gallery.

    With ``labels`` = (query_labels (Q,), gallery_labels (G,), SameLabel of the queries), also
    returns each query's first-positive rank, exact below ``rank_limit`` and set to
    ``rank_limit`` above it (counted on the chunk's scores when not in the list). Returns
    values (Q, k) float32, indices (Q, k) int64 and the ranks (Q,) int64 or None.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    values = torch.empty(num_query, k, device=query.device)
    indices = torch.empty(num_query, k, dtype=torch.int64, device=query.device)
    first = None if labels is None else torch.empty_like(indices[:, 0])
    buffer = torch.empty(min(query_chunk, num_query) * num_gallery, device=query.device)
    with exact_float32(query.device):
        for rows in even_ranges(num_query, query_chunk):
            part = slice(rows.start, rows.stop)
            scores = scores_into(query[part], gallery, buffer)
            mask_self(scores, None if self_index is None else self_index[part], 0)
            values[part], indices[part] = topk_exact(scores, k)
            if labels is None:
                continue
            query_labels, gallery_labels, same_label = labels
            chunk_first = first_positive_in_lists(indices[part], query_labels[part], gallery_labels)
            if rank_limit > k:
                relevant = same_label.num_relevant[part]
                beyond = ((chunk_first >= k) & (relevant > 0)).nonzero().flatten()
                step = max(1, len(rows) // 4)  # row copies: a quarter of the chunk at a time
                for s0 in range(0, beyond.numel(), step):
                    some = beyond[s0 : s0 + step]
                    chunk_same = same_label.rows(some + rows.start)
                    chunk_first[some] = count_first_positive(scores[some], chunk_same)
            first[part] = chunk_first.clamp(max=rank_limit)
    return values, indices, first


def search_self(
    x: Tensor,
    k: int,
    exclude_self: bool,
    block: int,
    labels: tuple[Tensor, Tensor, SameLabel] | None,
    rank_limit: int,
    budget: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The set ``x`` (N, d) searched against itself (:func:`knn_self`); first-positive
    ranks from the lists, and for the queries whose first positive is beyond the list (when
    ``rank_limit`` > k) by counting on their rows, recomputed a chunk at a time."""
    values, indices = knn_self(x, k, exclude_self, block)
    if labels is None:
        return values, indices, None
    query_labels, _, same_label = labels
    first = first_positive_in_lists(indices, query_labels, query_labels)
    beyond = ((first >= k) & (same_label.num_relevant > 0)).nonzero().flatten()
    if rank_limit > k and beyond.numel() > 0:
        # whole rows, at least one at a time; the lists above stay alive
        rest = budget - KEPT_LIST_BYTES * x.shape[0] * k
        row_bytes = SCORE_BYTES * x.shape[0] + 2 * LIST_BYTES * (k + 1)
        rows = max(1, rest // (row_bytes + 4 * int(same_label.count[beyond].max())))
        sub_labels = (query_labels[beyond], query_labels, same_label.rows(beyond))
        own = beyond if exclude_self else None
        counted = search_rows(x[beyond], x, k, own, rows, sub_labels, rank_limit)[2]
        first[beyond] = counted
    return values, indices, first.clamp(max=rank_limit)


def knn_self(x: Tensor, k: int, exclude_self: bool, block: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of every item of ``x`` (N, d) among the items of ``x`` (itself removed by
    index with ``exclude_self``), computing each score once.

    The rows are cut into blocks of at most ``block``, and only the blocks X_a X_b^T with
    a <= b are multiplied: each is reduced to top lists along its rows (for the items of a)
    and along its columns (for the items of b; no transposed copy), half the matmul work of a
    query x gallery search. Returns values (N, k) float32 and indices (N, k) int64.
    """
    num = x.shape[0]
    values = torch.full((num, k), float("-inf"), device=x.device)
    indices = torch.full((num, k), -1, dtype=torch.int64, device=x.device)  # placeholders
    blocks = even_ranges(num, block)
    widest = max(len(b) for b in blocks)
    buffer = torch.empty(widest * widest, device=x.device)
    with exact_float32(x.device):
        for a_index, a in enumerate(blocks):
            for b in blocks[a_index:]:
                scores = scores_into(x[a.start : a.stop], x[b.start : b.stop], buffer)
                if a == b and exclude_self:
                    scores.fill_diagonal_(float("-inf"))
                _merge_block(values, indices, a, scores, 1, b.start, k)
                if b != a:
                    _merge_block(values, indices, b, scores, 0, a.start, k)
    return values, indices


def _merge_block(
    values: Tensor, indices: Tensor, items: range, scores: Tensor, dim: int, offset: int, k: int
) -> None:
    """Merge the top-k along ``dim`` of the block ``scores`` into the lists of ``items``
    (in place): dim=1, the block's rows are those items and its columns the items from
    ``offset``; dim=0, the other way round."""
    part = slice(items.start, items.stop)
    v, i = topk_exact(scores, min(k, scores.shape[dim]), dim)
    values[part], indices[part] = merge_topk(values[part], indices[part], v, i + offset, k)


def knn_torch(
    query: Tensor,
    gallery: Tensor,
    k: int,
    self_index: Tensor | None,
    query_chunk: int,
    gallery_chunk: int,
) -> tuple[Tensor, Tensor]:
    """Exact top-k with explicit chunk sizes: query chunks against gallery blocks of at most
    ``gallery_chunk`` columns, merged into running lists.

    query (Q, d), gallery (G, d), self_index (Q,) int64 or None. Returns values (Q, k) float32
    and indices (Q, k) int64, each row ordered by the tie rule.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    values = torch.empty(num_query, k, device=query.device)
    indices = torch.empty(num_query, k, dtype=torch.int64, device=query.device)
    blocks = even_ranges(num_gallery, gallery_chunk)
    widest = max(len(b) for b in blocks)
    buffer = torch.empty(min(query_chunk, num_query) * widest, device=query.device)
    with exact_float32(query.device):
        for rows in even_ranges(num_query, query_chunk):
            part = slice(rows.start, rows.stop)
            chunk_self = None if self_index is None else self_index[part]
            best_v = best_i = None
            for cols in blocks:
                scores = scores_into(query[part], gallery[cols.start : cols.stop], buffer)
                mask_self(scores, chunk_self, cols.start)
                v, i = topk_exact(scores, min(k, len(cols)))
                if best_v is None:
                    best_v, best_i = v, i + cols.start
                else:
                    best_v, best_i = merge_topk(best_v, best_i, v, i + cols.start, k)
            values[part], indices[part] = best_v, best_i
    return values, indices
