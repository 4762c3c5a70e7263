"""Retrieval and clustering metrics: pure functions of ranked lists (and of embeddings for NMI).

Each retrieval metric is computed per query from what :func:`~.neighbours.search` returns: the
rank of the first same-label gallery item, or the relevance of each list position; the
caller averages over the queries that have at least one relevant item (R_i >= 1).

- Recall@K (= hit rate, CMC@K): 1 if one of the K nearest items shares the query's label,
  i.e. the first positive ranks below K. Precision@1 = Recall@1.
- R-precision = (1/R) sum_{i<=R} rel(i); MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) the
  precision of the first i items, R the number of relevant gallery items (Musgrave, Belongie,
  Lim, "A Metric Learning Reality Check", ECCV 2020).
- NMI: k-means clusters of the embeddings against the labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .faiss_index import import_faiss

# Deferred import: scikit-learn (~1-3 s to import), in nmi().


def relevance(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """rel(i) of each list position: (Q, L) bool, True where the item shares the query's label.

    indices: (Q, L) gallery indices in rank order (-1 = no item, never relevant).

    >>> relevance(torch.tensor([[2, 0], [1, -1]]), torch.tensor([7, 8]), torch.tensor([7, 8, 7]))
    tensor([[ True,  True],
            [ True, False]])
    """
    same = gallery_labels[indices.clamp(min=0)] == query_labels[:, None]
    return same & (indices >= 0)


def recall_at_k(first_positive: Tensor, k: int) -> Tensor:
    """Recall@K of each query: 1.0 where its first positive has 0-based rank < k.

    first_positive: (Q,) int64 ranks. Returns (Q,) float64.

    >>> recall_at_k(torch.tensor([0, 3, 1]), 2)
    tensor([1., 0., 1.], dtype=torch.float64)
    """
    return (first_positive < k).to(torch.float64)


def r_precision(relevant: Tensor, num_relevant: Tensor) -> Tensor:
    """R-precision of each query: the fraction of relevant items among its first R.

    relevant: (Q, L) bool rel(i), L >= max R; num_relevant: (Q,) R_i >= 1. Returns (Q,)
    float64.

    >>> r_precision(torch.tensor([[True, False, True], [False, True, False]]), torch.tensor([3, 2]))
    tensor([0.6667, 0.5000], dtype=torch.float64)
    """
    within_r = _first_r(relevant, num_relevant)
    return within_r.sum(dim=1).to(torch.float64) / num_relevant.clamp(min=1)


def map_at_r(relevant: Tensor, num_relevant: Tensor) -> Tensor:
    """MAP@R of each query: (1/R) sum over its first R positions of P(i) rel(i).

    relevant: (Q, L) bool rel(i), L >= max R; num_relevant: (Q,) R_i >= 1. Returns (Q,)
    float64. First row: R = 3, relevant at ranks 1 and 3: (1/1 + 2/3) / 3.

    >>> map_at_r(torch.tensor([[True, False, True], [False, True, False]]), torch.tensor([3, 2]))
    tensor([0.5556, 0.2500], dtype=torch.float64)
    """
    within_r = _first_r(relevant, num_relevant)
    positions = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision = within_r.cumsum(dim=1).to(torch.float64) / positions
    return (precision * within_r).sum(dim=1) / num_relevant.clamp(min=1)


def _first_r(relevant: Tensor, num_relevant: Tensor) -> Tensor:
    """rel(i) kept at positions i <= R_i only."""
    positions = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    return relevant & (positions[None, :] <= num_relevant[:, None])


def kmeans_assign(embeddings: Tensor, num_clusters: int, seed: int = 0, niter: int = 20) -> Tensor:
    """faiss k-means (``niter`` iterations, seeded) of ``embeddings`` (N, d) -> (N,) int64 ids."""
    faiss = import_faiss()
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
