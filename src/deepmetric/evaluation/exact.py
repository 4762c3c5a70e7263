"""Exact search with torch, in bounded memory: the ways :func:`~.neighbours.search` runs it.

Scores are float32 inner products ``query_rows @ gallery.T`` (:mod:`.blocks`); no function
here holds a Q x G matrix. Lists follow the tie rule (score descending, then gallery index
ascending).

- :func:`search_rows`: chunks of query rows against the whole gallery. Each chunk's c x G
  scores give its top-k lists and, for the rows whose first same-label item is not in the
  list, that item's rank by counting on the same scores (:mod:`.ranks`).
- :func:`search_self` / :func:`knn_self`: a set searched against itself. S = X X^T is
  symmetric, so only the blocks on and above the diagonal are multiplied, each reduced along
  its rows and its columns; ranks beyond the lists are counted on recomputed rows.
- :func:`knn_torch`: query chunks against gallery blocks of at most ``BLOCK_COLUMNS``,
  merged into running top lists, when no rank has to be counted (or whole rows do not fit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import (
    KEPT_LIST_BYTES,
    LIST_BYTES,
    SCORE_BYTES,
    even_ranges,
    exact_float32,
    mask_self,
    scores_into,
)
from .ranks import SameLabel, count_in_chunk, count_rows, first_positive_in_lists
from .topk import merge_topk, topk_exact


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
            chunk_same = same_label.rows(part)
            beyond = ((chunk_first >= k) & (chunk_same.num_relevant > 0)).nonzero().flatten()
            if rank_limit > k and beyond.numel() > 0:
                chunk_first[beyond] = count_in_chunk(scores, beyond, chunk_same)
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
        own = beyond if exclude_self else None
        first[beyond] = count_rows(x[beyond], x, own, same_label.rows(beyond), rows)
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
