"""The numbers of a report, from embeddings and labels: per-query AP@R and Recall@1, per-class
means, the worst and random queries with their top-k retrievals, the 2-D map, the verification
section (ROC, score histograms, thresholds) from the pair counts of
:mod:`deepmetric.evaluation.verification`.

Retrieval follows the evaluation exactly (:mod:`deepmetric.evaluation`): the same search
(score descending, then gallery index), the same per-query metric functions, each query's own
item excluded when the set is searched against itself, queries without a relevant gallery item
(R = 0) left out of every mean. Everything takes and returns NumPy arrays or plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepmetric.evaluation import METRICS, average, retrieval_per_query, search
from deepmetric.evaluation.verification import FARS, PairScoreCounts, float_of_key

from .content import ClassTable, EmbeddingMap, Grid, GridRow, Verification

# Deferred import: scikit-learn's TSNE (~1-3 s to import), in project_2d(), for method="tsne".

__all__ = [
    "QueryResults",
    "class_names",
    "class_table",
    "embedding_map",
    "far_name",
    "grid",
    "pick_random",
    "pick_worst",
    "project_2d",
    "query_results",
    "sample_query_rows",
    "top_k",
    "verification",
]

#: The metrics a report computes itself (with Recall@1 only).
REPORTED = ("recall", "map_at_r", "r_precision")


@dataclass
class QueryResults:
    """Per-query retrieval numbers of the evaluated queries (Q of them).

    rows: (Q,) evaluation-set row of each query; labels: (Q,) int64; num_relevant: (Q,) R_i;
    recall_at_1: (Q,) 1.0 when the nearest item shares the label; ap: (Q,) AP@R (the per-query
    term of MAP@R); summary: means over the queries with R_i >= 1 ("recall@1", "map@r",
    "r_precision", "num_queries"); per_class: :func:`~deepmetric.evaluation.retrieval.average`'s
    per-class arrays ("labels", "num_queries", "recall@1", "map@r", "r_precision").
    """

    rows: np.ndarray
    labels: np.ndarray
    num_relevant: np.ndarray
    recall_at_1: np.ndarray
    ap: np.ndarray
    summary: dict[str, float]
    per_class: dict[str, np.ndarray]

    @property
    def valid(self) -> np.ndarray:
        """(Q,) bool: queries with a relevant gallery item (those every mean counts)."""
        return self.num_relevant > 0


def sample_query_rows(labels: np.ndarray, max_queries: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the queries to evaluate: all of them when there are at most
    ``max_queries``, else those of whole classes drawn at random (seeded) until the next class
    would pass ``max_queries`` (at least one class), so per-class numbers stay exact."""
    labels = np.asarray(labels)
    if len(labels) <= max_queries:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(classes))
    cumulative = np.cumsum(counts[order])
    taken = classes[order[: max(1, int(np.searchsorted(cumulative, max_queries, "right")))]]
    return np.flatnonzero(np.isin(labels, taken))


def query_results(
    embeddings: np.ndarray,
    labels: np.ndarray,
    query_rows: np.ndarray,
    gallery_rows: np.ndarray | None,
    *,
    memory_budget_bytes: int = 2**30,
) -> QueryResults:
    """Per-query AP@R and Recall@1 of ``query_rows`` of the set (the exact search of
    :func:`deepmetric.evaluation.retrieval.retrieval_per_query`).

    embeddings: (N, d) float32; labels: (N,) int64; query_rows: (Q,) rows searched;
    gallery_rows: (G,) rows of the gallery (In-Shop style roles), or None: every item is in the
    gallery and each query's own row is excluded (as in the evaluation).
    """
    x = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    rows = torch.as_tensor(np.asarray(query_rows, dtype=np.int64))
    query, query_labels = x[rows], y[rows]
    if gallery_rows is None:
        everything = len(rows) == len(x)  # the symmetric search: each score computed once
        gallery, gallery_labels = (None, y) if everything else (x, y)
        self_index = torch.arange(len(x)) if everything else rows
    else:
        g = torch.as_tensor(np.asarray(gallery_rows, dtype=np.int64))
        gallery, gallery_labels, self_index = x[g], y[g], None
    per_query = retrieval_per_query(
        query,
        query_labels,
        gallery,
        gallery_labels,
        self_index,
        list_metrics=[METRICS["map_at_r"], METRICS["r_precision"]],
        rank_limit=1,
        backend="torch",
        budget=memory_budget_bytes,
        index_options=None,
    )
    metrics = [METRICS[name] for name in REPORTED]
    means = average(per_query, query_labels, (1,), metrics, per_class=True)
    per_class = {name: v.numpy() for name, v in means.pop("per_class").items()}
    return QueryResults(
        rows=rows.numpy(),
        labels=query_labels.numpy(),
        num_relevant=per_query["num_relevant"].numpy(),
        recall_at_1=(per_query["first_positive"] < 1).double().numpy(),
        ap=per_query["map@r"].numpy(),
        summary={k: v for k, v in means.items() if k != "num_queries_without_positive"},
        per_class=per_class,
    )


def pick_worst(results: QueryResults, n: int) -> np.ndarray:
    """Positions of the ``n`` queries with the lowest AP@R (ties: wrong nearest item first,
    then evaluation order), among those with a relevant item."""
    valid = np.flatnonzero(results.valid)
    order = np.lexsort((valid, results.recall_at_1[valid], results.ap[valid]))
    return valid[order[:n]]


def pick_random(results: QueryResults, n: int, seed: int) -> np.ndarray:
    """Positions of ``n`` queries drawn at random (seeded) among those with a relevant item,
    in evaluation order."""
    valid = np.flatnonzero(results.valid)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(valid, size=min(n, len(valid)), replace=False))


def top_k(
    embeddings: np.ndarray,
    rows: np.ndarray,
    gallery_rows: np.ndarray | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery items of the queries at ``rows`` (n,): (n, k) evaluation-set
    rows and (n, k) float32 scores, by :func:`deepmetric.evaluation.search` (own row excluded
    when ``gallery_rows`` is None, as in :func:`query_results`)."""
    x = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    if gallery_rows is None:
        found = search(x[rows_t], x, min(k, len(x) - 1), self_index=rows_t)
        return found.indices.numpy(), found.scores.numpy()
    g = np.asarray(gallery_rows, dtype=np.int64)
    found = search(x[rows_t], x[torch.as_tensor(g)], min(k, len(g)))
    return g[found.indices.numpy()], found.scores.numpy()


def grid(
    title: str,
    results: QueryResults,
    positions: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
) -> Grid:
    """A query grid: the queries at ``positions`` of ``results`` with their neighbours (n, k)
    (evaluation-set rows) and scores (n, k); ``labels`` (N,) of the whole set, ``names`` the
    class name of each label."""
    rows = []
    for position, hits, hit_scores in zip(positions, neighbours, scores):
        label = int(results.labels[position])
        rows.append(
            GridRow(
                query=str(int(results.rows[position])),
                query_label=names[label],
                ap=float(results.ap[position]),
                items=[str(int(h)) for h in hits],
                labels=[names[int(labels[h])] for h in hits],
                scores=[float(s) for s in hit_scores],
                correct=[bool(labels[h] == label) for h in hits],
            )
        )
    return Grid(title, rows)


def class_table(
    results: QueryResults, names: Sequence[str], max_classes: int, size_name: str = "images"
) -> ClassTable:
    """Per-class Recall@1 and MAP@R, worst first (Recall@1, then MAP@R, then label); the
    ``max_classes`` worst when there are more. ``size_name``: what the size column counts."""
    pc = results.per_class
    shown = [names[int(c)] for c in pc["labels"]]
    order = np.lexsort((pc["labels"], pc["map@r"], pc["recall@1"]))[:max_classes]
    return ClassTable(
        names=[shown[i] for i in order],
        size=[int(pc["num_queries"][i]) for i in order],
        recall_at_1=[float(pc["recall@1"][i]) for i in order],
        map_at_r=[float(pc["map@r"][i]) for i in order],
        total=len(shown),
        size_name=size_name,
    )


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(M, 2) coordinates of the rows of ``x`` (M, d): "pca" (the top two principal components,
    NumPy SVD, signs fixed so the largest loading is positive) or "tsne" (scikit-learn,
    PCA-initialised, seeded)."""
    x = np.asarray(x, dtype=np.float64)
    if method == "tsne" and len(x) > 5:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x)
    if method not in ("pca", "tsne"):
        raise ValueError(f"map method must be 'pca' or 'tsne', got {method!r}")
    centred = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    points = (u * s * signs)[:, :2]
    return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))  # d = 1 or a single point


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    max_points: int,
    method: str,
    seed: int,
) -> EmbeddingMap:
    """The 2-D map of a seeded random sample of at most ``max_points`` rows (all when fewer);
    colours number the classes present in the sample in label order."""
    count = len(labels)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(count, size=min(count, max_points), replace=False))
    points = project_2d(np.asarray(embeddings)[rows], method, seed)
    _, colour = np.unique(np.asarray(labels)[rows], return_inverse=True)
    return EmbeddingMap(
        method="t-SNE" if method == "tsne" else "PCA",
        points=[(float(a), float(b)) for a, b in points],
        keys=[str(int(r)) for r in rows],
        labels=[names[int(labels[r])] for r in rows],
        colours=[int(c) for c in colour],
        total=count,
    )


def class_names(labels: np.ndarray, names: Sequence[Any] | None) -> list[str]:
    """Display name of each label 0..max(labels): ``names`` when given, else the number."""
    if names is not None:
        return [str(n) for n in names]
    return [str(i) for i in range(int(np.max(labels)) + 1 if len(labels) else 0)]


def far_name(far: float) -> str:
    """The name of a FAR: 1e-3 for 0.001 (a power of ten), else the shortest form (0.05)."""
    power = round(math.log10(far))
    return f"1e{power}" if math.isclose(far, 10.0**power) else f"{far:g}"


def verification(
    counts: PairScoreCounts, *, bins: int = 100, roc_points: int = 200, line_far: float = 1e-3
) -> Verification:
    """The verification section of ``counts`` (it needs positive and negative pairs): AUC, EER
    and TAR@FAR for :data:`FARS` with their thresholds; the ROC sampled at the two points around
    each of ``roc_points`` log-spaced FARs from ``far_min`` (1e-5, or the power of ten at or
    below 1 / negatives) to 1, so at most 2 x roc_points points whatever the pair count; the
    pairs counted in ``bins`` score bins over the scores' range (rounded out to 0.1); lines at
    the EER threshold and at that of FAR ``line_far`` (when the set resolves it)."""
    far, tar, _ = counts.roc()
    far_min = max(1e-5, 10.0 ** math.floor(math.log10(1 / counts.num_negative)))
    grid = np.logspace(math.log10(far_min), 0.0, roc_points)
    below = np.searchsorted(far, grid, side="right") - 1  # last point with FAR <= the value
    keep = np.unique(np.r_[below, np.minimum(below + 1, len(far) - 1)])
    keep = keep[keep >= below[0]]  # from the last point at FAR <= far_min (drawn at far_min)
    eer, eer_threshold = counts.eer()
    at_far = [(f, *counts.tar_at_far(f)) for f in FARS]
    scores = float_of_key(counts.keys)  # (U,) decreasing
    lo = math.floor(scores[-1] * 10) / 10
    edges = np.linspace(lo, max(math.floor(scores[0] * 10) / 10 + 0.1, lo + 0.1), bins + 1)
    edges[-1] = max(edges[-1], np.nextafter(scores[0], np.inf))  # the top score in the last bin
    positive, negative = counts.histogram(edges)
    lines = [("EER", eer_threshold)]
    line = next((t for f, _, t in at_far if f == line_far), float("nan"))
    if math.isfinite(line):
        lines.append((f"FAR {far_name(line_far)}", line))
    return Verification(
        num_positive=counts.num_positive,
        num_negative=counts.num_negative,
        auc=counts.auc(),
        eer=(eer, eer_threshold),
        tar_at_far=at_far,
        roc=([float(max(f, far_min)) for f in far[keep]], [float(t) for t in tar[keep]]),
        far_min=far_min,
        edges=[float(e) for e in edges],
        positive=[int(c) for c in positive],
        negative=[int(c) for c in negative],
        thresholds=lines,
    )
