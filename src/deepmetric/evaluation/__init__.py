"""Retrieval evaluation: exact/approximate k-NN, Recall@K, MAP@R, R-precision, NMI, extraction.

Everything works in bounded memory (``memory_budget_bytes``, default 1 GiB): scores are
computed a chunk of queries at a time and reduced at once, never as a full Q x G matrix.
Ranking rule in every backend: score descending, then gallery index ascending.

Modules: ``retrieval`` (:func:`evaluate`), ``neighbours`` (:func:`search`, the one search entry
point, and :func:`knn`), ``metrics`` (pure metric functions of ranked lists, NMI), ``exact``
(torch search), ``blocks`` (chunk planning, score blocks), ``ranks`` (first-positive ranks),
``faiss_index`` (faiss backends), ``topk`` (exact top-k under the tie rule), ``checks``
(input validation), ``extract`` (embedding extraction).
"""

from __future__ import annotations

from .checks import BACKENDS
from .extract import extract_embeddings
from .faiss_index import FaissSearcher
from .metrics import kmeans_assign, map_at_r, nmi, r_precision, recall_at_k, relevance
from .neighbours import Neighbours, knn, search
from .retrieval import METRICS, evaluate

#: The K of Recall@K reported for each benchmark: CUB and Cars196 1, 2, 4, 8 as in the papers
#: (e.g. Wang et al., "Multi-Similarity Loss", CVPR 2019) plus 16 and 32 as the Deep_Metric
#: code reports; SOP 1-1000 (Oh Song et al., "Deep Metric Learning via Lifted Structured
#: Feature Embedding", CVPR 2016); In-Shop 1-50 (Liu et al., "DeepFashion", CVPR 2016).
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
    "Neighbours",
    "evaluate",
    "extract_embeddings",
    "kmeans_assign",
    "knn",
    "map_at_r",
    "nmi",
    "r_precision",
    "recall_at_k",
    "relevance",
    "search",
]
