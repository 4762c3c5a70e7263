"""evaluate(): retrieval and clustering metrics of embeddings, in bounded memory.

Reads top to bottom: check the inputs; decide how long the lists must be for the metrics
asked; search (:func:`~.neighbours.search`, a group of queries at a time when all their lists
would not fit half the budget); reduce the lists with the pure functions of :mod:`.metrics`;
average over the queries that have a relevant item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .blocks import LIST_BYTES, even_ranges
from .checks import as_query_gallery, check_backend, check_recall_at
from .faiss_index import FaissSearcher
from .metrics import recall_at_k, relevance
from .neighbours import search
from .ranks import SameLabel
from .registry import METRICS, Metric, check_metric_names
from .rerank import Reranking, check_rerank, prepare_rerank
from .verification import PairScoreCounts, pair_score_counts


def evaluate(
    query_emb: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_emb: Tensor | np.ndarray | None = None,
    gallery_labels: Tensor | np.ndarray | Sequence[int] | None = None,
    recall_at: Sequence[int] = (1, 2, 4, 8, 16, 32),
    metrics: Sequence[str] = ("recall", "map_at_r", "r_precision", "nmi"),
    *,
    self_index: Tensor | np.ndarray | Sequence[int] | None = None,
    per_class: bool = False,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    index_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    rerank: str = "none",
    rerank_options: Mapping[str, Any] | None = None,
    pair_counts: PairScoreCounts | None = None,
) -> dict[str, Any]:
    """Retrieval and clustering metrics of embeddings (definitions: :mod:`.metrics`).

    Args:
        query_emb: (Q, d) embeddings (L2-normalised for cosine similarity); query_labels (Q,)
            integer labels (int64; floats are rejected).
        gallery_emb, gallery_labels: (G, d) and (G,), or both None: the query set is its own
            gallery and each query's own item is excluded by index.
        recall_at: the K of Recall@K (``deepmetric.data.SOURCES[name].recall_at`` for the
            benchmarks).
        metrics: any of "recall", "precision_at_1", "map_at_r", "r_precision", "nmi", and the
            verification metrics over all pairs "roc_auc", "eer", "tar_at_far" (or
            "verification" for the three; :mod:`.verification`).
        self_index: with a gallery, (Q,) int64 gallery index of each query's own copy (-1 =
            none): that item is never retrieved and not counted in R_i, as when the query set
            is part of the gallery (PML's ``ref_includes_query``). ``evaluate(x, y, x, y,
            self_index=arange(N))`` equals ``evaluate(x, y)``.
        per_class: also return per-class Recall@1, MAP@R and R-precision.
        backend: "auto"/"torch" (exact, inputs' device), "faiss" (exact), "faiss-ivf" or
            "faiss-hnsw" (approximate: metrics of the approximate neighbour lists).
        memory_budget_bytes: bound on the working memory (default 1 GiB).
        index_options: options of the approximate faiss indexes.
        seed: k-means seed for NMI.
        rerank: "none", "k_reciprocal" or "alpha_qe" (:mod:`.rerank`, options in
            ``rerank_options``): Recall@K, Precision@1, MAP@R and R-precision are those of
            the re-ranked lists (exact search of the re-ranking's vectors with ``backend``).
            k_reciprocal re-orders each list's first ``candidates`` items; a first positive
            beyond them keeps its original rank. NMI and the pair metrics ignore it.
        pair_counts: the verification metrics' pair counts when already made (torchrun: the
            ranks count their shares together, :class:`~deepmetric.engine.evaluator.Evaluator`).

    Returns:
        dict with "recall@K" per K, "precision@1", "map@r", "r_precision", "nmi" (those
        requested; floats, NaN when no query has a positive), "num_queries" (queries in the
        retrieval metrics), "num_queries_without_positive"; with verification metrics
        "roc_auc", "eer", "tar@far=1e-1" .. "tar@far=1e-5" and the score thresholds
        "eer_threshold", "threshold@far=1e-1" .., "num_positive_pairs", "num_negative_pairs";
        with ``per_class`` a
        "per_class" dict of CPU tensors: "labels" (C,), "num_queries" (C,), "recall@1",
        "map@r", "r_precision" (C,) float64, over the classes with evaluated queries.
    """
    asked = [METRICS[name] for name in check_metric_names(metrics)]
    recall_at = check_recall_at(recall_at)
    backend = check_backend(backend, index_options)
    check_rerank(rerank, dict(rerank_options or {}))
    query, query_labels, gallery, gallery_labels, self_index = as_query_gallery(
        query_emb, query_labels, gallery_emb, gallery_labels, self_index
    )
    if gallery is None:  # the query set against itself: each query's own item excluded
        self_index = torch.arange(query.shape[0], device=query.device)

    result: dict[str, Any] = {}
    # per_class reports Recall@1, MAP@R and R-precision whatever ``metrics`` asks
    lists = [m for m in METRICS.values() if m.needs == "lists" and (per_class or m in asked)]
    # first-positive ranks are exact below the largest K asked
    rank_limit = max([int(per_class), *(max(m.ks(recall_at)) for m in asked if m.needs == "ranks")])
    if rank_limit > 0 or lists:
        options = {
            "list_metrics": lists,
            "rank_limit": rank_limit,
            "backend": backend,
            "budget": memory_budget_bytes,
            "index_options": index_options,
        }
        # the vectors searched (alpha_qe: expanded) and k_reciprocal's re-ordering of lists
        reranking = prepare_rerank(
            rerank, query, gallery, self_index, dict(rerank_options or {}), memory_budget_bytes
        )
        searched, searched_gallery = reranking.query, reranking.gallery
        own = None if self_index is None else self_index >= 0
        if own is not None and bool(own.any()) and not bool(own.all()):
            # queries with and without an own copy can retrieve G - 1 and G items: two searches
            per_query = {}
            for rows, index in ((own, self_index[own]), (~own, None)):
                part = retrieval_per_query(
                    searched[rows],
                    query_labels[rows],
                    searched_gallery,
                    gallery_labels,
                    index,
                    reranking=reranking.rows(rows),
                    **options,
                )
                for name, values in part.items():
                    merged = per_query.setdefault(name, values.new_empty(query.shape[0]))
                    merged[rows.cpu()] = values
        else:
            per_query = retrieval_per_query(
                searched,
                query_labels,
                searched_gallery,
                gallery_labels,
                self_index,
                reranking=reranking,
                **options,
            )
        result.update(average(per_query, query_labels, recall_at, asked, per_class))
    for m in asked:
        if m.needs == "embeddings":
            result[m.key] = m.function(query, query_labels, seed=seed)
    pair_metrics = [m for m in asked if m.needs == "pairs"]
    if pair_metrics:
        if pair_counts is None:
            pair_counts = pair_score_counts(
                query,
                query_labels,
                gallery,
                None if gallery is None else gallery_labels,
                self_index=None if gallery is None else self_index,
                memory_budget_bytes=memory_budget_bytes,
            )
        result.update(verification_results(pair_counts, pair_metrics))
    return result


def verification_results(counts: PairScoreCounts, metrics: Sequence[Metric]) -> dict[str, Any]:
    """The pairs ``metrics`` of ``counts`` by result key, with the thresholds and pair counts
    (NaN for every metric when the set has no positive or no negative pair)."""
    result: dict[str, Any] = {}
    usable = counts.num_positive > 0 and counts.num_negative > 0
    for m in metrics:
        for k, key in zip(m.ks(()) or (None,), m.keys(())):
            result[key] = m.function(counts, k) if usable else float("nan")
    if usable:
        result["eer_threshold"] = counts.eer()[1]
        for far, key in zip(counts.fars, METRICS["tar_at_far"].keys(())):
            result[key.replace("tar@", "threshold@")] = counts.tar_at_far(far)[1]
    result["num_positive_pairs"] = counts.num_positive
    result["num_negative_pairs"] = counts.num_negative
    return result


def retrieval_per_query(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None,
    gallery_labels: Tensor,
    self_index: Tensor | None,
    *,
    list_metrics: Sequence[Metric],
    rank_limit: int,
    backend: str,
    budget: int,
    index_options: Mapping[str, Any] | None,
    reranking: Reranking | None = None,
) -> dict[str, Tensor]:
    """Per-query values on the CPU: "num_relevant" R_i (Q,) int64, "first_positive" (Q,)
    int64 (exact below ``rank_limit``), and each of ``list_metrics`` under its key (Q,)
    float64.

    List length: R_max (the longest R_i) with list metrics; for ranks alone the shorter of
    R_max and ``rank_limit`` (the first positive of most queries lies within their first R
    items; the torch backend counts the others' ranks, faiss lists are extended to
    ``rank_limit``). gallery None: the query set, own items excluded. ``reranking``
    (:func:`~.rerank.prepare_rerank` of these queries): lists of at least its
    ``candidates``, whose head it re-orders.
    """
    num_query = query.shape[0]
    full_gallery = query if gallery is None else gallery
    num_relevant = SameLabel.build(query_labels, gallery_labels, self_index).num_relevant
    available = full_gallery.shape[0] - int(
        self_index is not None and bool((self_index >= 0).any())
    )
    longest = int(num_relevant.max())
    k = min(longest if list_metrics else min(longest, rank_limit), available)
    out = {"num_relevant": num_relevant.cpu()}
    if k < 1:  # no query has a relevant item: nothing to search
        out["first_positive"] = torch.full((num_query,), rank_limit)
        out.update({m.key: torch.zeros(num_query, dtype=torch.float64) for m in list_metrics})
        return out

    if reranking is not None:
        k = max(k, reranking.candidates)
    # the lists of a group of queries and their reductions take at most half the budget
    group = max(1, budget // (2 * LIST_BYTES * k))
    groups = even_ranges(num_query, group)
    budget -= min(num_query, group) * LIST_BYTES * k
    index = full_gallery
    if backend != "torch":
        index = FaissSearcher(full_gallery, backend, index_options)
    elif gallery is None and len(groups) == 1:
        index = None  # the query set against itself: each score computed once
    parts: dict[str, list[Tensor]] = {"first_positive": [], **{m.key: [] for m in list_metrics}}
    for rows in groups:
        part = slice(rows.start, rows.stop)
        found = search(
            query[part],
            index,
            k,
            self_index=None if self_index is None else self_index[part],
            query_labels=query_labels[part],
            gallery_labels=gallery_labels,
            rank_limit=rank_limit,
            memory_budget_bytes=budget,
        )
        if reranking is not None:
            found = reranking.apply(part, found, query_labels[part], gallery_labels)
        if rank_limit > 0:
            parts["first_positive"].append(found.first_positive.cpu())
        if list_metrics:
            relevant = relevance(found.indices, query_labels[part], gallery_labels)
            for m in list_metrics:
                parts[m.key].append(m.function(relevant, found.num_relevant).cpu())
    out.update({name: torch.cat(values) for name, values in parts.items() if values})
    return out


def average(
    per_query: dict[str, Tensor],
    query_labels: Tensor,
    recall_at: tuple[int, ...],
    metrics: Sequence[Metric],
    per_class: bool,
) -> dict[str, Any]:
    """Means over the queries with R_i >= 1 (NaN when there is none) of the ranks and lists
    ``metrics``, their count, and with ``per_class`` the means per query label."""
    valid = per_query["num_relevant"] > 0
    num_valid = int(valid.sum())
    values = {name: v[valid] for name, v in per_query.items()}

    def mean(x: Tensor) -> float:
        return float(x.to(torch.float64).mean()) if num_valid else float("nan")

    result: dict[str, Any] = {}
    for m in metrics:
        if m.needs == "ranks":
            for k, key in zip(m.ks(recall_at), m.keys(recall_at)):
                result[key] = mean(m.function(values["first_positive"], k))
        elif m.needs == "lists":
            result[m.key] = mean(values[m.key])
    result["num_queries"] = num_valid
    result["num_queries_without_positive"] = int(valid.numel() - num_valid)
    if per_class:
        classes, inverse = torch.unique(query_labels.cpu()[valid], return_inverse=True)
        counts = torch.bincount(inverse, minlength=classes.numel())

        def class_mean(x: Tensor) -> Tensor:
            return torch.bincount(inverse, x.to(torch.float64), classes.numel()) / counts

        result["per_class"] = {
            "labels": classes,
            "num_queries": counts,
            "recall@1": class_mean(recall_at_k(values["first_positive"], 1)),
            "map@r": class_mean(values["map@r"]),
            "r_precision": class_mean(values["r_precision"]),
        }
    return result
