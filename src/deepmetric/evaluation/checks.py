"""Input validation of the evaluation functions, written once.

Embeddings become float32 tensors (on their own device), labels and self indices int64
tensors on the embeddings' device; anything empty, of the wrong rank or dtype, non-finite or
of mismatched length raises a ``ValueError`` that names the offending argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf", "faiss-hnsw")
APPROXIMATE_BACKENDS = ("faiss-ivf", "faiss-hnsw")


def as_embeddings(x: Tensor | np.ndarray, name: str) -> Tensor:
    """Validate an embedding matrix and return it as a float32 tensor (N, d), same device."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    x = x.detach().to(torch.float32).contiguous()
    # row extremes propagate NaN and infinities; torch.isfinite(x) would allocate 5 B/entry
    finite = torch.isfinite(x.amax(dim=1)) & torch.isfinite(x.amin(dim=1))
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        count = int((~finite).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({count} rows, first: row {bad})")
    return x


def as_labels(
    y: Tensor | np.ndarray | Sequence[int], n: int, name: str, device: torch.device
) -> Tensor:
    """Validate integer labels of length ``n``; return them as int64 on ``device`` (never float)."""
    y = _as_tensor(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"{name} must be integers, got dtype {y.dtype} (labels are never cast to float: "
            "large ids would collide)"
        )
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but the embeddings have {n} rows")
    return y.detach().to(device=device, dtype=torch.int64)


def as_self_index(
    self_index: Tensor | np.ndarray | Sequence[int],
    num_query: int,
    num_gallery: int,
    device: torch.device,
) -> Tensor:
    """Validate ``self_index`` (Q,): the gallery index of each query's own copy, -1 for none.

    Returns it as int64 on ``device``. The convention is the losses' ``self_index``.
    """
    index = _as_tensor(self_index)
    if index.ndim != 1 or index.shape[0] != num_query:
        raise ValueError(
            f"self_index must have shape ({num_query},) (one entry per query), "
            f"got {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"self_index must be integers, got dtype {index.dtype}")
    index = index.detach().to(device=device, dtype=torch.int64)
    bad = (index < -1) | (index >= num_gallery)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"self_index[{row}] = {int(index[row])} is not a gallery index in "
            f"[0, {num_gallery}) nor -1 (no own copy)"
        )
    return index


def check_same_space(query: Tensor, gallery: Tensor, same_device: bool = True) -> None:
    """Query and gallery must share dimension (and device, unless ``same_device`` is False)."""
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery dimensions differ: {query.shape[1]} vs {gallery.shape[1]}"
        )
    if same_device and query.device != gallery.device:
        raise ValueError(
            f"query and gallery on different devices: {query.device} vs {gallery.device}"
        )


def check_backend(backend: str, index_options: object = None) -> str:
    """Validate a backend name; "auto" means "torch" (exact, any device, no faiss needed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if index_options and backend not in APPROXIMATE_BACKENDS:
        raise ValueError(f"index_options only apply to {APPROXIMATE_BACKENDS}")
    return "torch" if backend == "auto" else backend


def check_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    """The K of Recall@K: positive ints, returned sorted without repeats."""
    values = tuple(recall_at)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"recall_at must be a non-empty sequence of positive ints: {recall_at!r}")
    return tuple(sorted(set(values)))


def _as_tensor(x: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x if isinstance(x, Tensor) else torch.as_tensor(x)


def as_query_gallery(
    query_emb: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Sequence[int],
    gallery_emb: Tensor | np.ndarray | None,
    gallery_labels: Tensor | np.ndarray | Sequence[int] | None,
    self_index: Tensor | np.ndarray | Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Validated (query (Q, d) float32, query labels (Q,) int64, gallery (G, d) or None,
    gallery labels (G,) (the query labels without a gallery), self_index (Q,) int64 or None)
    of an evaluation: a query set against a gallery, or against itself."""
    query = as_embeddings(query_emb, "query_emb")
    query_labels = as_labels(query_labels, query.shape[0], "query_labels", query.device)
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("give both gallery_emb and gallery_labels, or neither")
    if gallery_emb is None:
        if self_index is not None:
            raise ValueError("self_index needs a gallery (without one, self is excluded)")
        return query, query_labels, None, query_labels, None
    gallery = as_embeddings(gallery_emb, "gallery_emb")
    check_same_space(query, gallery)
    gallery_labels = as_labels(gallery_labels, gallery.shape[0], "gallery_labels", query.device)
    if self_index is not None:
        self_index = as_self_index(self_index, query.shape[0], gallery.shape[0], query.device)
    return query, query_labels, gallery, gallery_labels, self_index
