"""Class subsets and class-disjoint validation splits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import MetricDataset, to_tensor

__all__ = ["ClassSubset", "class_disjoint_split", "subset_classes"]

_KEEP: Any = object()


def _as_long(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1))


class ClassSubset(MetricDataset):
    """The samples of some classes of a data set, labels re-indexed to ``0..len(classes)-1``
    in increasing order of the parent's labels (``class_ids`` / ``class_names`` follow).

    Args:
        dataset: a data set with ``labels`` (N,) (a deepmetric data set, or any Dataset that
            has ``labels``, ``class_ids`` optional).
        classes: contiguous labels of ``dataset`` to keep.
        transform: a transform replacing the parent's (e.g. the test pipeline for a
            validation subset; needs ``dataset.load_image``); default: the parent's.
    """

    def __init__(
        self,
        dataset: Dataset,
        classes: Sequence[int] | torch.Tensor,
        transform: Callable | None = _KEEP,
    ) -> None:
        parent_labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        parent_c = int(getattr(dataset, "num_classes", int(parent_labels.max()) + 1))
        keep = torch.unique(_as_long(classes))  # sorted
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= parent_c):
            raise ValueError(
                f"classes must lie in 0..{parent_c - 1}, got {int(keep.min())}..{int(keep.max())}"
            )
        self.dataset = dataset
        self.name = getattr(dataset, "name", type(dataset).__name__)
        self.split = getattr(dataset, "split", "all")
        self.role = getattr(dataset, "role", None)
        self.indices = torch.nonzero(torch.isin(parent_labels, keep)).flatten()
        remap = torch.full((parent_c,), -1, dtype=torch.long)
        remap[keep] = torch.arange(keep.numel())
        self.labels = remap[parent_labels[self.indices]]
        parent_ids = getattr(dataset, "class_ids", None)
        self.class_ids = (
            torch.as_tensor(parent_ids)[keep] if parent_ids is not None else keep.clone()
        )
        parent_names = getattr(dataset, "class_names", None)
        self.class_names = (
            [parent_names[int(c)] for c in keep]
            if parent_names is not None
            else [str(int(c)) for c in self.class_ids]
        )
        for attr in ("is_query", "is_gallery", "super_labels"):
            value = getattr(dataset, attr, None)
            setattr(self, attr, None if value is None else value[self.indices])
        self.super_class_ids = getattr(dataset, "super_class_ids", None)
        if transform is not _KEEP and not hasattr(dataset, "load_image"):
            raise TypeError("a new transform needs a data set with load_image()")
        self._own_transform = transform is not _KEEP
        self.transform = transform if self._own_transform else getattr(dataset, "transform", None)

    def load_image(self, index: int) -> Any:
        return self.dataset.load_image(int(self.indices[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        if not self._own_transform:
            image = self.dataset[int(self.indices[index])][0]
            return image, label
        image = self.load_image(index)
        image = self.transform(image) if self.transform is not None else to_tensor(image)
        return image, label


def subset_classes(
    dataset: Dataset, classes: Sequence[int] | torch.Tensor, transform: Callable | None = _KEEP
) -> ClassSubset:
    """The samples of the given contiguous classes of ``dataset``, labels re-indexed.

    Args:
        dataset: a deepmetric data set (anything with ``labels``).
        classes: labels in ``0..dataset.num_classes-1`` to keep, e.g. from
            :func:`class_disjoint_split`.
        transform: replaces the parent's transform when given (None = plain tensors).

    Returns:
        A :class:`ClassSubset` (labels (M,) in ``0..len(classes)-1``, original ``class_ids``).
    """
    return ClassSubset(dataset, classes, transform)


def class_disjoint_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, val_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the classes present in ``labels`` into disjoint train and validation classes.

    Args:
        labels: (N,) integer labels.
        val_fraction: fraction of the classes (not of the images) put in validation, in
            [0, 1); at least one class when > 0, and at least one class left for training.
        seed: seed of the random class permutation (numpy ``default_rng``).

    Returns:
        ``(train_classes, val_classes)``: sorted (C_train,) and (C_val,) long tensors.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    classes = torch.unique(_as_long(labels))
    c = classes.numel()
    n_val = round(c * float(val_fraction))
    if val_fraction > 0:
        if c < 2:
            raise ValueError(f"need at least 2 classes for a validation split, got {c}")
        n_val = min(max(n_val, 1), c - 1)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(c))
    val = torch.sort(classes[perm[:n_val]]).values
    train = torch.sort(classes[perm[n_val:]]).values
    return train, val
