"""Class subsets, class-disjoint validation splits, and the split of data that has none."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DatasetError, ImageDataset, MetricDataset, to_tensor

__all__ = [
    "SPLIT_BY",
    "ClassSubset",
    "class_disjoint_split",
    "class_fold_split",
    "describe_split",
    "split_unsplit",
    "subset_classes",
    "write_split_csv",
]

SPLIT_BY = ("classes", "images")

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


def class_fold_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, folds: int, fold: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``fold`` of ``folds`` class-disjoint cross-validation folds ("A Metric Learning
    Reality Check"): the classes present in ``labels``, sorted, cut into ``folds`` contiguous
    blocks of (nearly) equal size; block ``fold`` is validation, the others train.

    Returns:
        ``(train_classes, val_classes)``: sorted (C_train,) and (C_val,) long tensors.
    """
    classes = torch.unique(_as_long(labels))  # sorted
    c = classes.numel()
    if not 2 <= folds <= c:
        raise ValueError(f"need 2 <= folds <= number of classes ({c}), got folds={folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    start, stop = (fold * c) // folds, ((fold + 1) * c) // folds
    in_val = torch.zeros(c, dtype=torch.bool)
    in_val[start:stop] = True
    return classes[~in_val], classes[in_val]


def _held_out_count(test_classes: float | int, num_classes: int) -> int:
    """Number of test classes for ``data.test_classes`` (a fraction in (0, 1) or a count)."""
    if isinstance(test_classes, float) and not test_classes.is_integer():
        if not 0.0 < test_classes < 1.0:
            raise ValueError(f"test_classes: a fraction must lie in (0, 1), got {test_classes}")
        count = min(max(round(num_classes * test_classes), 1), num_classes - 1)
    else:
        count = int(test_classes)
    if not 1 <= count <= num_classes - 1:
        raise ValueError(
            f"test_classes={test_classes}: the data has {num_classes} classes; hold out "
            f"between 1 and {num_classes - 1} of them (or a fraction such as 0.5)"
        )
    return count


def split_unsplit(
    ds: MetricDataset,
    split: str,
    *,
    test_classes: float | int | None = None,
    test_images: float = 0.5,
    split_by: str = "classes",
    seed: int = 0,
) -> MetricDataset:
    """The ``split`` part ("train", "test" or "all") of a data set that has no split of its
    own (a flat folder, a CSV without a ``split`` column, a single list file, an npz file
    without ``classes``).

    ``split_by="classes"`` (zero-shot, the default): ``test_classes`` classes (a fraction in
    (0, 1) or a count; default half), drawn with ``numpy.random.default_rng(seed)``, are held
    out for testing; the two parts share no class. ``split_by="images"`` (closed-set): a
    ``test_images`` fraction of each class's images (at least one image of each class with two
    or more stays on each side) is held out; test classes are training classes.

    Returns:
        A data set of the same type with labels re-indexed to its own classes in increasing
        original order (train and test parts of one split never share a label map) and
        ``generated_split`` describing the rule (written by the trainer into the run folder).
    """
    if split == "all":
        return ds
    if split not in ("train", "test"):
        raise ValueError(f"{ds.name}: data without a split of its own has train and test only")
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    labels = ds.labels.numpy()
    rng = np.random.default_rng(seed)
    if split_by == "classes":
        if ds.num_classes < 2:
            raise DatasetError(
                f"{ds.name}: {ds.num_classes} class; a zero-shot split needs at least 2"
            )
        n_test = _held_out_count(0.5 if test_classes is None else test_classes, ds.num_classes)
        held_out = rng.permutation(ds.num_classes)[:n_test]
        is_test = np.isin(labels, held_out)
        rule = {"by": "classes", "test_classes": n_test, "seed": seed}
    else:
        if test_classes is not None:
            raise ValueError("test_classes applies to split_by=classes; use test_images")
        if not 0.0 < test_images < 1.0:
            raise ValueError(f"test_images must be a fraction in (0, 1), got {test_images}")
        is_test = np.zeros(len(labels), dtype=bool)
        for c in range(ds.num_classes):
            members = np.flatnonzero(labels == c)
            if members.size < 2:
                continue
            n_test = min(max(round(members.size * test_images), 1), members.size - 1)
            is_test[rng.permutation(members)[:n_test]] = True
        rule = {"by": "images", "test_images": test_images, "seed": seed}
    part = ds.select(torch.as_tensor(is_test if split == "test" else ~is_test))
    if split == "train":
        part.is_query = part.is_gallery = None
    part = part.compact()
    part.split = split
    part.generated_split = rule
    return part


def write_split_csv(path: str | os.PathLike, train: ImageDataset, test: ImageDataset) -> None:
    """Write the two parts as an OML-style CSV (``label, path, split, is_query, is_gallery,
    class_name``; absolute paths, original class ids as labels) that ``build_dataset("csv",
    path)`` reads back into the same train and test sets, in the same order."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["label", "path", "split", "is_query", "is_gallery", "class_name"])
        for part, name in ((train, "train"), (test, "validation")):
            q = part.is_query if part.is_query is not None else None
            g = part.is_gallery if part.is_gallery is not None else None
            for i, (p, label) in enumerate(zip(part.paths, part.labels.tolist())):
                roles = ["", ""]
                if name == "validation":
                    roles = [int(q is None or bool(q[i])), int(g is None or bool(g[i]))]
                out.writerow(
                    [
                        int(part.class_ids[label]),
                        os.path.abspath(p),
                        name,
                        *roles,
                        part.class_names[label],
                    ]
                )
    os.replace(tmp, path)


def describe_split(rule: dict[str, Any]) -> str:
    """One line for the ``generated_split`` rule of :func:`split_unsplit`."""
    if rule["by"] == "classes":
        return (
            f"zero-shot: {rule['test_classes']} classes held out for testing, never trained on "
            f"(data.test_classes, data.split_seed={rule['seed']})"
        )
    return (
        f"CLOSED-SET: {rule['test_images']:.0%} of each class's images held out for testing; "
        f"the test classes are training classes (data.split_by=images, "
        f"data.split_seed={rule['seed']})"
    )
