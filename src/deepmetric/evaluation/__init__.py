"""Retrieval evaluation: exact/approximate k-NN, Recall@K, MAP@R, R-precision, NMI, extraction.

Everything works in bounded memory (``memory_budget_bytes``, default 1 GiB): scores are
computed a chunk of queries at a time and reduced at once, never as a full Q x G matrix.
Ranking rule in every backend: score descending, then gallery index ascending.

Modules: ``registry`` (one record per metric: config name, result keys, display name, what
it needs), ``retrieval`` (:func:`evaluate`), ``neighbours`` (:func:`search`, the one search entry
point, and :func:`knn`), ``metrics`` (pure metric functions of ranked lists, NMI), ``exact``
(torch search), ``blocks`` (chunk planning, score blocks), ``ranks`` (first-positive ranks),
``faiss_index`` (faiss backends), ``topk`` (exact top-k under the tie rule), ``checks``
(input validation), ``extract`` (embedding extraction), ``verification`` (ROC, AUC, TAR@FAR,
EER over all pairs, exact), ``rerank`` (k-reciprocal, alpha-QE), ``open_set`` (thresholds
calibrated on validation classes, open-set decisions).
"""

from __future__ import annotations

from .checks import BACKENDS
from .extract import extract_embeddings
from .faiss_index import FaissSearcher
from .metrics import kmeans_assign, map_at_r, nmi, r_precision, recall_at_k, relevance
from .neighbours import Neighbours, knn, search
from .registry import (
    METRICS,
    Metric,
    check_metric_names,
    display_name,
    metric_of_key,
    ordered_keys,
    result_key,
    result_keys,
)
from .retrieval import average, evaluate, retrieval_per_query
from .verification import FARS, PairScoreCounts, pair_score_counts

__all__ = [
    "BACKENDS",
    "FARS",
    "METRICS",
    "FaissSearcher",
    "Metric",
    "Neighbours",
    "PairScoreCounts",
    "average",
    "check_metric_names",
    "display_name",
    "evaluate",
    "extract_embeddings",
    "kmeans_assign",
    "knn",
    "map_at_r",
    "metric_of_key",
    "nmi",
    "ordered_keys",
    "pair_score_counts",
    "r_precision",
    "recall_at_k",
    "relevance",
    "result_key",
    "result_keys",
    "retrieval_per_query",
    "search",
]
