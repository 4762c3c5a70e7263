"""The one search entry point: each query's ranked gallery list, and what the metrics need of it.

Ranking rule, in every backend: score (float32 inner product) descending, then gallery index
ascending. The torch backend computes the scores a chunk at a time, never as a Q x G matrix
(:mod:`.exact`); the faiss backends find candidates with an index and re-score them with the
same torch product (:mod:`.faiss_index`), so exact duplicates tie and are ordered by index in
both. Two backends may still round the score of one pair differently in the last bit, so a
near-tie between different vectors can order differently across backends.

:func:`search` chooses how to run (all return the same :class:`Neighbours`):

- torch, the query set searched against itself with each query's own item excluded (or
  kept), when its lists fit the budget: :func:`~.exact.search_self`, each score computed
  once; queries whose first positive is beyond their list get its rank by counting on their
  recomputed rows (only when ``rank_limit`` asks for ranks beyond the list);
- torch, ranks beyond the lists asked and whole gallery rows fit the budget:
  :func:`~.exact.search_rows`, counting on the same scores;
- otherwise: lists of max(k, rank_limit), where every rank below ``rank_limit`` can be read,
  from :func:`~.exact.knn_torch` (gallery blocks merged into running lists) or faiss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .blocks import LIST_BYTES, even_ranges, plan_blocks, plan_chunks, plan_self_block
from .checks import as_embeddings, as_labels, as_self_index, check_backend, check_same_space
from .exact import knn_torch, search_rows, search_self
from .faiss_index import FaissSearcher
from .ranks import SameLabel, first_positive_in_lists

Array = Tensor | np.ndarray


@dataclass(frozen=True)
class Neighbours:
    """Ranked gallery lists of Q queries, whatever backend or path produced them.

    indices: (Q, k) int64 gallery indices in rank order (-1 where an approximate index found
        fewer than k items); scores: (Q, k) float32 (-inf there).
    num_relevant: (Q,) int64 R_i, the gallery items sharing query i's label, its own copy not
        counted; None without labels.
    first_positive: (Q,) int64 0-based rank of each query's first same-label item, exact when
        below ``rank_limit`` and equal to ``rank_limit`` otherwise (also when R_i = 0); None
        when not asked (``rank_limit`` = 0).
    """

    indices: Tensor
    scores: Tensor
    num_relevant: Tensor | None = None
    first_positive: Tensor | None = None
    rank_limit: int = 0


def search(
    query: Array,
    gallery: Array | FaissSearcher | None,
    k: int,
    *,
    self_index: Array | None = None,
    query_labels: Array | None = None,
    gallery_labels: Array | None = None,
    rank_limit: int = 0,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    index_options: Mapping[str, Any] | None = None,
) -> Neighbours:
    """Top-k gallery items of each query by inner product, in bounded memory.

    Args:
        query: (Q, d) embeddings (L2-normalised for cosine similarity).
        gallery: (G, d); or None for the query set itself (then the torch backend computes
            each score of the symmetric matrix once when the Q x k lists fit the budget); or a
            :class:`~.faiss_index.FaissSearcher` built once and searched by several calls.
        k: list length, 1 <= k <= G (G - 1 when some query has an own item).
        self_index: (Q,) int64 gallery index of each query's own copy, -1 for none; that item
            is never returned and not counted in R_i.
        query_labels, gallery_labels: (Q,), (G,) integer labels (gallery_labels may be left
            out when gallery is None); give them for ``num_relevant`` and ``first_positive``.
        rank_limit: compute each query's first-positive rank, exactly below this number
            (Recall@K needs ranks below max K); 0 = not at all.
        backend: "auto" (= "torch"), "torch" (exact, on the inputs' device), "faiss"
            (``IndexFlatIP``, exact, CPU), "faiss-ivf" or "faiss-hnsw" (approximate, CPU; see
            :class:`~.faiss_index.FaissSearcher` for ``index_options``).
        memory_budget_bytes: bound on the working memory beyond the inputs and the returned
            lists (default 1 GiB).

    Returns:
        :class:`Neighbours` on the query's device.
    """
    query = as_embeddings(query, "query")
    searcher = gallery if isinstance(gallery, FaissSearcher) else None
    if searcher is not None:
        if backend not in ("auto", searcher.backend) or index_options:
            raise ValueError("a FaissSearcher is searched with its own backend and options")
        backend, gallery = searcher.backend, searcher.gallery
    backend = check_backend(backend, index_options)
    same_set = gallery is None
    gallery = query if same_set else as_embeddings(gallery, "gallery")
    check_same_space(query, gallery, same_device=searcher is None)
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    if self_index is not None:
        self_index = as_self_index(self_index, num_query, num_gallery, query.device)
    available = num_gallery - int(self_index is not None and bool((self_index >= 0).any()))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(f"k must be an integer in [1, {available}], got {k!r}")
    labels, same_label = None, None
    if query_labels is not None:
        query_labels = as_labels(query_labels, num_query, "query_labels", query.device)
        if gallery_labels is None and same_set:
            gallery_labels = query_labels
        gallery_labels = as_labels(gallery_labels, num_gallery, "gallery_labels", query.device)
        same_label = SameLabel.build(query_labels, gallery_labels, self_index)
        if rank_limit > 0:
            labels = (query_labels, gallery_labels, same_label)
    elif rank_limit > 0:
        raise ValueError("rank_limit needs query_labels (and gallery_labels)")
    budget = memory_budget_bytes
    length = min(available, max(k, rank_limit))  # lists that hold every rank < rank_limit

    if backend == "torch":
        counts = labels is not None and rank_limit > k  # ranks beyond the lists are counted
        extra = 4 * int(same_label.count.max()) if counts else 0
        rows, cols = plan_chunks(num_query, num_gallery, k, budget, extra)
        whole_rows = cols == num_gallery  # what counting needs
        own_is_diagonal = self_index is None or torch.equal(
            self_index, torch.arange(num_query, device=query.device)
        )
        symmetric = same_set and own_is_diagonal and (whole_rows or not counts)
        block = plan_self_block(num_query, k, budget) if symmetric else 0
        if block:
            found = search_self(query, k, self_index is not None, block, labels, rank_limit, budget)
        elif counts and whole_rows:
            found = search_rows(query, gallery, k, self_index, rows, labels, rank_limit)
        else:
            rows, cols = plan_blocks(num_query, num_gallery, length, budget)

            def find(part: slice) -> tuple[Tensor, Tensor]:
                own = None if self_index is None else self_index[part]
                return knn_torch(query[part], gallery, length, own, rows, cols)

            found = search_lists(num_query, k, rows, find, labels, rank_limit)
    else:
        searcher = searcher or FaissSearcher(gallery, backend, index_options)
        rows = max(1, budget // (2 * LIST_BYTES * (length + 2)))

        def find(part: slice) -> tuple[Tensor, Tensor]:
            own = None if self_index is None else self_index[part]
            values, indices = searcher.search(query[part], length, own)
            return values.to(query.device), indices.to(query.device)

        found = search_lists(num_query, k, rows, find, labels, rank_limit)

    values, indices, first = found
    relevant = None if same_label is None else same_label.num_relevant
    return Neighbours(indices, values, relevant, first, rank_limit if first is not None else 0)


def search_lists(
    num_query: int,
    k: int,
    query_chunk: int,
    find: Callable[[slice], tuple[Tensor, Tensor]],
    labels: tuple[Tensor, Tensor, SameLabel] | None,
    rank_limit: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Lists of every query chunk from ``find(rows)`` ((c, L) values and indices, L >= k and
    L >= rank_limit, so that every first-positive rank below ``rank_limit`` is in the list);
    returns them cut to k, and the ranks."""
    values, indices, firsts = [], [], []
    for rows in even_ranges(num_query, query_chunk):
        part = slice(rows.start, rows.stop)
        chunk_values, chunk_indices = find(part)
        values.append(chunk_values[:, :k])
        indices.append(chunk_indices[:, :k])
        if labels is not None:
            query_labels, gallery_labels, _ = labels
            chunk_first = first_positive_in_lists(chunk_indices, query_labels[part], gallery_labels)
            firsts.append(chunk_first.clamp(max=rank_limit))
    first = torch.cat(firsts) if labels is not None else None
    return torch.cat(values), torch.cat(indices), first


def knn(
    query: Array,
    gallery: Array | None,
    k: int,
    *,
    exclude_self: bool = False,
    self_index: Array | None = None,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    index_options: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k gallery items of each query by inner product: :func:`search` without labels.

    Args:
        query: (Q, d) embeddings; gallery: (G, d), or None for the query set itself.
        k: number of neighbours, 1 <= k <= G (G - 1 when some query has an own item).
        exclude_self: query i and gallery i are the same item (requires Q == G); the same as
            ``self_index = arange(Q)``.
        self_index: (Q,) int64 gallery index of each query's own copy (-1 = none), never
            returned.
        backend, memory_budget_bytes, index_options: as in :func:`search`.

    Returns:
        (similarities (Q, k) float32, indices (Q, k) int64) on the query's device, each row
        sorted by score descending, then gallery index ascending.
    """
    if exclude_self:
        if self_index is not None:
            raise ValueError("give exclude_self or self_index, not both")
        num_query = len(query)
        num_gallery = num_query if gallery is None else len(gallery)
        if num_query != num_gallery:
            raise ValueError(
                f"exclude_self needs query i = gallery i: got {num_query} queries, "
                f"{num_gallery} gallery items"
            )
        self_index = torch.arange(num_query)
    found = search(
        query,
        gallery,
        k,
        self_index=self_index,
        backend=backend,
        memory_budget_bytes=memory_budget_bytes,
        index_options=index_options,
    )
    return found.scores, found.indices
