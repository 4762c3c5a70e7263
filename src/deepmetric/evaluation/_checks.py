"""Input validation shared by the evaluation functions.

Embeddings become float32 tensors (on their own device), labels int64 tensors; anything
empty, of the wrong rank, non-finite or of mismatched length raises a ``ValueError`` that
names the offending argument.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        count = int((~finite).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({count} rows, first: row {bad})")
    return x


def as_labels(y: Tensor | np.ndarray | list, n: int, name: str, device: torch.device) -> Tensor:
    """Validate integer labels of length ``n``; return them as int64 on ``device`` (never float)."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    elif not isinstance(y, Tensor):
        y = torch.as_tensor(y)
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


def check_same_space(query: Tensor, gallery: Tensor) -> None:
    """Query and gallery must share dimension and device."""
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery dimensions differ: {query.shape[1]} vs {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise ValueError(
            f"query and gallery on different devices: {query.device} vs {gallery.device}"
        )
