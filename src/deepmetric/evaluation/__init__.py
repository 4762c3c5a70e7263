"""Retrieval evaluation: exact/approximate k-NN, Recall@K, MAP@R, R-precision, NMI, extraction.

Everything works in bounded memory (``memory_budget_bytes``, default 1 GiB): scores are
computed a chunk of queries at a time and reduced at once, never as a full Q x G matrix.
Ranking rule in every backend: score descending, then gallery index ascending.
"""

from __future__ import annotations

from .extract import extract_embeddings
from .metrics import METRICS, evaluate, kmeans_assign, nmi
from .search import BACKENDS, FaissSearcher, ann_agreement, knn

#: The K of Recall@K reported for each benchmark (papers + seed; REFERENCE §7.1).
RECALL_AT: dict[str, tuple[int, ...]] = {
    "cub": (1, 2, 4, 8, 16, 32),
    "cars196": (1, 2, 4, 8, 16, 32),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}

__all__ = [
    "BACKENDS",
    "METRICS",
    "RECALL_AT",
    "FaissSearcher",
    "ann_agreement",
    "evaluate",
    "extract_embeddings",
    "kmeans_assign",
    "knn",
    "nmi",
]
