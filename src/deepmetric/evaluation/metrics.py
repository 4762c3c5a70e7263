"""Retrieval and clustering metrics: Recall@K, Precision@1, R-precision, MAP@R, NMI.

Definitions (REFERENCE §7.1). Scores are inner products; gallery items are ranked by score
descending, then gallery index ascending. When the gallery is the query set, each query's own
item is removed by index. For query i, R_i = number of gallery items with its label (its own
item not counted); queries with R_i = 0 are left out of the retrieval metrics and counted in
"num_queries_without_positive".

- Recall@K: 1 if any of the first K items shares the query's label (rank of the first positive
  < K), averaged over queries. Precision@1 = Recall@1.
- R-precision = (1/R) sum_{i<=R} rel(i); MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) = precision
  of the first i (Musgrave, Belongie, Lim 2020).
- NMI: faiss k-means (k = number of distinct query labels, 20 iterations, seeded) on the query
  embeddings, then scikit-learn's ``normalized_mutual_info_score`` with
  ``average_method="arithmetic"``.

Algorithm (torch backend). When the gallery is the query set (and its N x L lists fit the
budget), :func:`~deepmetric.evaluation.search.knn_self` computes each score of the symmetric
N x N matrix once (half the matmul work) and keeps exact top-L lists, L = largest R: they give
MAP@R, R-precision, and the first-positive rank when it is < L. For the queries whose first
positive lies beyond the list, and only when some K > L asks for it, the rank is counted on
their recomputed full rows: ``#{j: s_j > s*} + #{j < j*: s_j = s*}`` where s*, j* is the best
positive (highest score, lowest index), read from the same scores.
With a separate gallery, each query chunk of c rows gets its c x G scores (matmuls into a
reused buffer, by column blocks of ``CPU_BLOCK_COLUMNS`` on the CPU, where they run faster),
self masked by index, the same top-L lists, and the same counting on the rows that need it.
When even ``MIN_QUERY_ROWS`` rows against the whole gallery exceed the budget, gallery blocks
are merged into running top lists of length max(L, largest K) instead, and that list gives
every metric; the faiss backends use the same list form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import as_embeddings, as_labels, check_same_space
from .search import (
    APPROXIMATE_BACKENDS,
    LIST_BYTES,
    FaissSearcher,
    block_topk,
    column_blocks,
    exact_float32,
    knn_self,
    knn_torch,
    mask_self,
    plan_chunks,
    plan_knn,
    plan_self_block,
    resolve_backend,
    scores_into,
)

METRICS = ("recall", "precision_at_1", "map_at_r", "r_precision", "nmi")
RETRIEVAL_METRICS = ("recall", "precision_at_1", "map_at_r", "r_precision")


class Positives:
    """Where each query's same-label gallery items are, without a Q x G mask.

    The gallery is stably sorted by label, so ``order[start[i] : start[i] + count[i]]`` lists
    query i's same-label gallery indices in ascending order. ``num_relevant`` (Q,) is R_i
    (``count - 1`` when the query's own item is in the gallery).
    """

    def __init__(self, query_labels: Tensor, gallery_labels: Tensor, exclude_self: bool) -> None:
        sorted_labels, self.order = torch.sort(gallery_labels, stable=True)
        unique, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.searchsorted(unique, query_labels).clamp(max=unique.numel() - 1)
        found = unique[slot] == query_labels
        self.start = torch.where(found, starts[slot], 0)
        self.count = torch.where(found, counts[slot], 0)
        self.num_relevant = self.count - int(exclude_self)


def list_metrics(
    top: Tensor, gallery_labels: Tensor, query_labels: Tensor, num_relevant: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Metrics of c queries from their ranked lists.

    top: (c, L) gallery indices in rank order (-1 = no item), L >= every R_i;
    query_labels, num_relevant: (c,). Returns the first-positive rank (c,) int64 (-1 when no
    positive is in the list), average precision at R (c,) and R-precision (c,), float64.
    """
    length = top.shape[1]
    relevant = (gallery_labels[top.clamp(min=0)] == query_labels[:, None]) & (top >= 0)
    first = torch.where(
        relevant.any(dim=1), relevant.to(torch.uint8).argmax(dim=1), torch.full_like(top[:, 0], -1)
    )
    positions = torch.arange(1, length + 1, device=top.device)
    relevant_r = relevant & (positions[None, :] <= num_relevant[:, None])
    hits = relevant_r.cumsum(dim=1).to(torch.float64)
    precision = hits / positions.to(torch.float64)
    r = num_relevant.clamp(min=1).to(torch.float64)
    ap = (precision * relevant_r).sum(dim=1) / r
    rp = relevant_r.sum(dim=1).to(torch.float64) / r
    return first, ap, rp


def count_first_rank(
    scores: list[Tensor],
    blocks: list[range],
    rows: Tensor | None,
    query_ids: Tensor,
    positives: Positives,
) -> Tensor:
    """Rank of the first positive for ``rows`` of a query chunk's scores, by counting.

    scores: the chunk's column blocks, (c, len(block)) each, ``blocks`` their gallery columns,
    covering the whole gallery in order, self already -inf; rows: (r,) row numbers in the
    chunk, or None for all c rows; query_ids: (r,) the matching global query indices.
    rank = #{j: s_j > s*} + #{j < j*: s_j = s*}, where s*, j* is the best positive (highest
    score, then lowest index), read from the same scores. No positive scores above s*, and
    positives equal to s* have indices >= j*, so both terms count negatives only.
    """
    device = scores[0].device
    count, start = positives.count[query_ids], positives.start[query_ids]
    offsets = torch.arange(int(count.max()), device=device)
    valid = offsets[None, :] < count[:, None]
    pos_index = positives.order[(start[:, None] + offsets[None, :]).clamp(max=blocks[-1].stop - 1)]
    row_ids = torch.arange(query_ids.numel(), device=device) if rows is None else rows
    pos_scores = torch.full(pos_index.shape, float("-inf"), device=device)
    for block, cols in zip(scores, blocks):
        inside = valid & (pos_index >= cols.start) & (pos_index < cols.stop)
        local = (pos_index - cols.start).clamp_(0, len(cols) - 1)
        pos_scores = torch.where(inside, block[row_ids[:, None], local], pos_scores)
    best_score = pos_scores.max(dim=1, keepdim=True).values
    is_best = (pos_scores == best_score) & valid
    best_index = pos_index.gather(1, is_best.to(torch.uint8).argmax(dim=1, keepdim=True))[:, 0]
    # sign(s_j - s*) is 1 above, 0 equal, -1 below: with sums A = sum sign and
    # B = sum |sign|, #above = (A + B) / 2 and #equal = width - B. Float passes, exact for
    # widths < 2^24, and on the CPU several times faster than summing bool masks.
    rank = torch.zeros(query_ids.numel(), dtype=torch.int64, device=device)
    equal = torch.zeros_like(rank)
    scratch = torch.empty(row_ids.numel() * len(blocks[0]), device=device)
    for block in scores:
        block_rows = block if rows is None else block[rows]
        sign = torch.sub(block_rows, best_score, out=scratch[: block_rows.numel()].view(
            block_rows.shape)).sign_()
        total = sign.sum(dim=1)
        nonzero = sign.abs_().sum(dim=1)
        rank += ((total + nonzero) / 2).to(torch.int64)
        equal += block_rows.shape[1] - nonzero.to(torch.int64)
    tied_negatives = equal - is_best.sum(dim=1)  # rare: duplicates, quantised embeddings
    for t in (tied_negatives > 0).nonzero().flatten().tolist():
        row, j_best, s_best = int(row_ids[t]), int(best_index[t]), best_score[t, 0]
        for block, cols in zip(scores, blocks):
            if cols.start < j_best:
                before = block[row, : min(len(cols), j_best - cols.start)]
                rank[t] += (before == s_best).sum()
    return rank


def _retrieval_counting(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    self_index: Tensor | None,
    positives: Positives,
    list_size: int,
    query_chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query (first rank, AP@R, R-precision) with the whole gallery in each score block."""
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    first = torch.empty(num_query, dtype=torch.int64)
    ap = torch.empty(num_query, dtype=torch.float64)
    rp = torch.empty(num_query, dtype=torch.float64)
    buffer = torch.empty(min(query_chunk, num_query) * num_gallery, device=query.device)
    blocks = column_blocks(num_gallery, num_gallery, query.device)
    with exact_float32(query.device):
        for q0 in range(0, num_query, query_chunk):
            q1 = min(num_query, q0 + query_chunk)
            relevant = positives.num_relevant[q0:q1]
            chunk_self = None if self_index is None else self_index[q0:q1]
            _, top, scores = block_topk(
                query[q0:q1], gallery, blocks, list_size, chunk_self, buffer, keep_scores=True
            )
            chunk_first, chunk_ap, chunk_rp = list_metrics(
                top, gallery_labels, query_labels[q0:q1], relevant
            )
            rows = ((chunk_first < 0) & (relevant > 0)).nonzero().flatten()
            step = max(1, query_chunk // 4)  # row copies: a quarter of the chunk at a time
            for s0 in range(0, rows.numel(), step):
                part = rows[s0 : s0 + step]
                chunk_first[part] = count_first_rank(scores, blocks, part, part + q0, positives)
            first[q0:q1] = chunk_first.cpu()
            ap[q0:q1] = chunk_ap.cpu()
            rp[q0:q1] = chunk_rp.cpu()
    return first, ap, rp


def _retrieval_self(
    x: Tensor,
    labels: Tensor,
    positives: Positives,
    list_size: int,
    block: int,
    count_beyond_list: bool,
    budget: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query (first rank, AP@R, R-precision) when the gallery is the query set itself.

    Top lists of ``list_size`` from :func:`knn_self` (each score computed once); queries whose
    first positive is not in their list get it by counting (``count_first_rank``) over their
    full rows, recomputed a chunk at a time, when ``count_beyond_list`` (some K > list_size);
    otherwise their rank is set to N (a miss for every K <= list_size).
    """
    num = x.shape[0]
    _, top = knn_self(x, list_size, True, block)
    first = torch.empty(num, dtype=torch.int64, device=x.device)
    ap = torch.empty(num, dtype=torch.float64, device=x.device)
    rp = torch.empty(num, dtype=torch.float64, device=x.device)
    step = max(1, budget // (LIST_BYTES * (list_size + 1)))  # list_metrics' temporaries
    for q0 in range(0, num, step):
        rows = slice(q0, q0 + step)
        first[rows], ap[rows], rp[rows] = list_metrics(
            top[rows], labels, labels[rows], positives.num_relevant[rows]
        )
    missing = ((first < 0) & (positives.num_relevant > 0)).nonzero().flatten()
    first[first < 0] = num
    if count_beyond_list and missing.numel() > 0:
        extra = 4 * int(positives.count.max())
        query_chunk, _ = plan_chunks(missing.numel(), num, 0, budget, extra_row_bytes=extra)
        blocks = column_blocks(num, num, x.device)
        buffer = torch.empty(min(query_chunk, missing.numel()) * num, device=x.device)
        with exact_float32(x.device):
            for r0 in range(0, missing.numel(), query_chunk):
                chunk = missing[r0 : r0 + query_chunk]
                queries, scores, offset = x[chunk], [], 0
                for cols in blocks:
                    block_scores = scores_into(queries, x[cols.start : cols.stop], buffer, offset)
                    mask_self(block_scores, chunk, cols.start)
                    scores.append(block_scores)
                    offset += block_scores.numel()
                first[chunk] = count_first_rank(scores, blocks, None, chunk, positives)
    return first.cpu(), ap.cpu(), rp.cpu()


def _retrieval_lists(
    query_labels: Tensor,
    gallery_labels: Tensor,
    positives: Positives,
    list_size: int,
    query_chunk: int,
    search: Callable[[int, int], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query (first rank, AP@R, R-precision) from ranked lists of ``list_size`` items.

    ``search(q0, q1)`` returns the (q1 - q0, list_size) ranked gallery indices of those
    queries. A first positive beyond the list gets rank G (a miss for every K <= list_size).
    """
    num_query, num_gallery = query_labels.shape[0], gallery_labels.shape[0]
    first = torch.empty(num_query, dtype=torch.int64)
    ap = torch.empty(num_query, dtype=torch.float64)
    rp = torch.empty(num_query, dtype=torch.float64)
    for q0 in range(0, num_query, query_chunk):
        q1 = min(num_query, q0 + query_chunk)
        top = search(q0, q1).to(gallery_labels.device)
        chunk_first, chunk_ap, chunk_rp = list_metrics(
            top, gallery_labels, query_labels[q0:q1], positives.num_relevant[q0:q1]
        )
        chunk_first[chunk_first < 0] = num_gallery
        first[q0:q1] = chunk_first.cpu()
        ap[q0:q1] = chunk_ap.cpu()
        rp[q0:q1] = chunk_rp.cpu()
    return first, ap, rp


def kmeans_assign(embeddings: Tensor, num_clusters: int, seed: int = 0, niter: int = 20) -> Tensor:
    """faiss k-means (``niter`` iterations, seeded) of ``embeddings`` (N, d) -> (N,) int64 ids."""
    import faiss

    x = np.ascontiguousarray(embeddings.detach().cpu().numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(
        x.shape[1], num_clusters, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64))


def nmi(embeddings: Tensor, labels: Tensor, seed: int = 0) -> float:
    """NMI between labels (N,) and faiss k-means clusters (k = #labels, 20 iterations, seeded).

    Uses scikit-learn's ``normalized_mutual_info_score(..., average_method="arithmetic")``
    (normalised by the arithmetic mean of the two entropies; scikit-learn < 0.22 used the
    geometric mean).
    """
    from sklearn.metrics import normalized_mutual_info_score

    num_clusters = int(torch.unique(labels).numel())
    clusters = kmeans_assign(embeddings, num_clusters, seed=seed)
    return float(
        normalized_mutual_info_score(
            labels.cpu().numpy(), clusters.numpy(), average_method="arithmetic"
        )
    )


def _check_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    values = tuple(recall_at)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"recall_at must be a non-empty sequence of positive ints: {recall_at!r}")
    return tuple(sorted(set(values)))


def evaluate(
    query_emb: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_emb: Tensor | np.ndarray | None = None,
    gallery_labels: Tensor | np.ndarray | Sequence[int] | None = None,
    recall_at: Sequence[int] = (1, 2, 4, 8, 16, 32),
    metrics: Sequence[str] = ("recall", "map_at_r", "r_precision", "nmi"),
    *,
    per_class: bool = False,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    index_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Retrieval and clustering metrics of embeddings (module docstring: definitions).

    Args:
        query_emb: (Q, d) embeddings (L2-normalised for cosine similarity); query_labels (Q,)
            integer labels (int64; floats are rejected).
        gallery_emb, gallery_labels: (G, d) and (G,), or both None: the query set is its own
            gallery and each query's own item is excluded by index.
        recall_at: the K of Recall@K (``RECALL_AT[name]`` for the benchmarks).
        metrics: any of "recall", "precision_at_1", "map_at_r", "r_precision", "nmi".
        per_class: also return per-class Recall@1, MAP@R and R-precision.
        backend: "auto"/"torch" (exact, inputs' device), "faiss" (exact), "faiss-ivf" or
            "faiss-hnsw" (approximate: metrics of the approximate neighbour lists).
        memory_budget_bytes: bound on the working memory of the search (default 1 GiB).
        index_options: options of the approximate faiss indexes.
        seed: k-means seed for NMI.

    Returns:
        dict with "recall@K" per K, "precision@1", "map@r", "r_precision", "nmi" (those
        requested; floats, NaN when no query has a positive), "num_queries" (queries in the
        retrieval metrics), "num_queries_without_positive", and with ``per_class`` a
        "per_class" dict of CPU tensors: "labels" (C,), "num_queries" (C,), "recall@1",
        "map@r", "r_precision" (C,) float64, over the classes with evaluated queries.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    recall_at = _check_recall_at(recall_at)
    backend = resolve_backend(backend)
    if index_options and backend not in APPROXIMATE_BACKENDS:
        raise ValueError(f"index_options only apply to {APPROXIMATE_BACKENDS}")
    query = as_embeddings(query_emb, "query_emb")
    query_labels = as_labels(query_labels, query.shape[0], "query_labels", query.device)
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("give both gallery_emb and gallery_labels, or neither")
    exclude_self = gallery_emb is None
    if exclude_self:
        gallery, gallery_labels = query, query_labels
    else:
        gallery = as_embeddings(gallery_emb, "gallery_emb")
        check_same_space(query, gallery)
        gallery_labels = as_labels(gallery_labels, gallery.shape[0], "gallery_labels", query.device)

    result: dict[str, Any] = {}
    if any(m in metrics for m in RETRIEVAL_METRICS) or per_class:
        first, ap, rp, relevant = _retrieval(
            query,
            query_labels,
            gallery,
            gallery_labels,
            exclude_self,
            recall_at,
            metrics,
            backend,
            memory_budget_bytes,
            index_options,
        )
        valid = relevant > 0
        num_valid = int(valid.sum())
        first, ap, rp = first[valid], ap[valid], rp[valid]

        def mean(x: Tensor) -> float:
            return float(x.to(torch.float64).mean()) if num_valid else float("nan")

        if "recall" in metrics:
            for k in recall_at:
                result[f"recall@{k}"] = mean(first < k)
        if "precision_at_1" in metrics:
            result["precision@1"] = mean(first < 1)
        if "map_at_r" in metrics:
            result["map@r"] = mean(ap)
        if "r_precision" in metrics:
            result["r_precision"] = mean(rp)
        result["num_queries"] = num_valid
        result["num_queries_without_positive"] = int(query.shape[0] - num_valid)
        if per_class:
            labels = query_labels.cpu()[valid]
            classes, inverse = torch.unique(labels, return_inverse=True)
            counts = torch.bincount(inverse, minlength=classes.numel())
            result["per_class"] = {
                "labels": classes,
                "num_queries": counts,
                "recall@1": torch.bincount(inverse, (first < 1).double(), classes.numel()) / counts,
                "map@r": torch.bincount(inverse, ap, classes.numel()) / counts,
                "r_precision": torch.bincount(inverse, rp, classes.numel()) / counts,
            }
    if "nmi" in metrics:
        result["nmi"] = nmi(query, query_labels, seed=seed)
    return result


def _retrieval(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    exclude_self: bool,
    recall_at: tuple[int, ...],
    metrics: Sequence[str],
    backend: str,
    budget: int,
    index_options: Mapping[str, Any] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-query first-positive rank, AP@R, R-precision (CPU) and R (CPU), any backend."""
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    positives = Positives(query_labels, gallery_labels, exclude_self)
    relevant = positives.num_relevant
    max_relevant = int(relevant.max())
    if max_relevant <= 0:  # nobody has a positive: nothing to search
        empty = torch.zeros(num_query, dtype=torch.float64)
        return torch.full((num_query,), -1), empty, empty.clone(), relevant.cpu()
    available = num_gallery - int(exclude_self)
    list_size = min(max_relevant, available)
    self_index = torch.arange(num_query, device=query.device) if exclude_self else None
    # list length when the first positive must be read from the list itself
    longest_k = max(recall_at) if ("recall" in metrics) else 1
    long_list = min(available, max(list_size, longest_k))

    if backend == "torch":
        # positives gathered for a quarter of the rows: index 8 B + score 4 B + masks
        extra = 4 * int(positives.count.max())
        query_chunk, gallery_chunk = plan_chunks(
            num_query, num_gallery, list_size, budget, extra_row_bytes=extra
        )
        block = plan_self_block(num_query, list_size, budget) if exclude_self else 0
        if block and gallery_chunk == num_gallery:
            first, ap, rp = _retrieval_self(
                query, query_labels, positives, list_size, block, longest_k > list_size, budget
            )
            return first, ap, rp, relevant.cpu()
        if gallery_chunk == num_gallery:
            first, ap, rp = _retrieval_counting(
                query,
                query_labels,
                gallery,
                gallery_labels,
                self_index,
                positives,
                list_size,
                query_chunk,
            )
            return first, ap, rp, relevant.cpu()
        query_chunk, gallery_chunk = plan_knn(
            num_query, num_gallery, long_list, budget, query.device
        )

        def search(q0: int, q1: int) -> Tensor:
            chunk_self = None if self_index is None else self_index[q0:q1]
            return knn_torch(query[q0:q1], gallery, long_list, chunk_self, q1 - q0, gallery_chunk)[
                1
            ]

    else:
        searcher = FaissSearcher(gallery, backend, index_options)
        query_chunk = max(1, budget // (2 * LIST_BYTES * (long_list + 2)))

        def search(q0: int, q1: int) -> Tensor:
            chunk_self = None if self_index is None else self_index[q0:q1]
            return searcher.search(query[q0:q1], long_list, chunk_self)[1]

    first, ap, rp = _retrieval_lists(
        query_labels, gallery_labels, positives, long_list, query_chunk, search
    )
    return first, ap, rp, relevant.cpu()
