"""In-memory array data sets: an ``.npz`` file (e.g. Omniglot) and scikit-learn's digits.

Images are held as one uint8 tensor (N, C, H, W); ``load_image`` returns image i as a
(C, H, W) float32 tensor in [0, 1], which the ``"small"`` transform preset accepts.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import (
    DatasetError,
    DataSource,
    MetricDataset,
    MissingFileError,
    RootRequiredError,
    check_counts,
    encode_labels,
)

# Deferred import: sklearn.datasets (1-2 s to import; the digits set only), in
# load_digits_dataset.

__all__ = ["DIGITS", "NPZ", "ArrayDataset", "load_digits_dataset", "load_npz"]

DIGITS_SPLITS = {"train": (0, 5), "test": (5, 10), "all": (0, 10)}


class ArrayDataset(MetricDataset):
    """Images held in memory.

    Args:
        images: (N, C, H, W) uint8 tensor (0 = black, 255 = white).
        raw_ids: (N,) original integer class ids.
        name, split: for messages.
        transform: applied to the (C, H, W) float32 tensor in [0, 1]; None = returned as is.
    """

    def __init__(
        self,
        images: torch.Tensor,
        raw_ids: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        name: str = "arrays",
        split: str = "all",
        transform: Callable | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a (N, C, H, W) uint8 tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        raw = [int(x) for x in np.asarray(raw_ids).reshape(-1)]
        if len(raw) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(raw)} labels")
        if not raw:
            raise DatasetError(f"{name} {split}: no images")
        self.images = images.contiguous()
        self.name, self.split, self.transform = name, split, transform
        self.labels, self.class_ids, self.class_names = encode_labels(raw)

    def select(self, mask: torch.Tensor) -> ArrayDataset:
        """A copy restricted to the rows where ``mask`` (N,) is true, keeping the label map."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.images, new.labels = self.images[mask], self.labels[mask]
        return new

    def load_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as a (C, H, W) float32 tensor in [0, 1]."""
        return self.images[index].float().div_(255.0)


def _select_classes(labels: np.ndarray, classes: Sequence[int] | None, source: str) -> np.ndarray:
    """Boolean mask of the samples whose label lies in the half-open range ``classes``."""
    if classes is None:
        return np.ones(labels.shape[0], dtype=bool)
    if isinstance(classes, (str, bytes)) or len(classes) != 2:
        raise ValueError(f"classes must be a pair (first, end) (half-open range), got {classes!r}")
    lo, hi = int(classes[0]), int(classes[1])
    mask = (labels >= lo) & (labels < hi)
    if not mask.any():
        raise DatasetError(f"{source}: no sample has a class id in [{lo}, {hi})")
    return mask


def _to_uint8(images: np.ndarray, invert: bool) -> np.ndarray:
    """bool -> {0, 255}; uint8 kept; floats in [0, 1] scaled by 255 (else taken as 0..255)."""
    if images.dtype == np.bool_:
        out = images.astype(np.uint8) * 255
    elif images.dtype == np.uint8:
        out = images
    elif np.issubdtype(images.dtype, np.number):
        x = images.astype(np.float32)
        if x.size and float(x.max()) <= 1.0:
            x = x * 255.0
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    else:
        raise DatasetError(f"unsupported image dtype {images.dtype}")
    return 255 - out if invert else out


def _resize(images: torch.Tensor, size: int | None, chunk: int = 2048) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 to (N, C, size, size) with antialiased bilinear (in chunks)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    parts = []
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts)


def load_npz(
    root: str | os.PathLike | None,
    split: str = "all",
    transform: Callable | None = None,
    *,
    file: str | None = None,
    images_key: str = "images",
    labels_key: str = "labels",
    classes: Sequence[int] | None = None,
    invert: bool = False,
    size: int | None = None,
) -> ArrayDataset:
    """Load images and labels from an ``.npz`` file (read with ``allow_pickle=False``).

    Accepted shapes: images (C, N, H, W) with labels (C, N) (Omniglot), images (N, H, W),
    (N, H, W, 1|3) or (N, 1|3, H, W) with labels (N,). dtypes: bool, uint8, or float
    (in [0, 1], else taken as 0..255).

    Args:
        root: the ``.npz`` file, or its folder with ``file`` naming it.
        split: a name only (selection is done by ``classes``); without ``classes`` the file
            has no split and comes back as split "all" (``build_dataset`` then holds out
            classes for testing, see ``test_classes``).
        transform: applied to each (C, H, W) float tensor in [0, 1].
        classes: half-open range ``(first, end)`` of original class ids to keep, e.g.
            ``(0, 764)`` for training and ``(764, 964)`` for validation on Omniglot.
        invert: ``255 - x``: for Omniglot (True = paper) so that ink is bright.
        size: resize every image once, at load time, to ``size`` x ``size`` pixels.
    """
    if root is None:
        raise RootRequiredError("npz", NPZ.root)
    path = os.fspath(root) if file is None else os.path.join(os.fspath(root), file)
    if not os.path.isfile(path):
        raise MissingFileError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in (images_key, labels_key):
                if key not in data.files:
                    raise DatasetError(f"{path}: no array {key!r} (arrays: {data.files})")
            images, labels = data[images_key], data[labels_key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: labels must be integers, got dtype {labels.dtype}")

    if labels.ndim == 2 and images.ndim == 4 and images.shape[:2] == labels.shape:
        images = images.reshape(-1, 1, *images.shape[2:])
        labels = labels.reshape(-1)
    elif labels.ndim == 1 and images.shape[:1] == labels.shape:
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        elif not (images.ndim == 4 and images.shape[1] in (1, 3)):
            raise DatasetError(f"{path}: unsupported images shape {images.shape}")
    else:
        raise DatasetError(
            f"{path}: images {images.shape} and labels {labels.shape} do not match "
            "(expected (C, N, H, W) with (C, N), or (N, ...) with (N,))"
        )
    mask = _select_classes(labels, classes, path)
    images = torch.from_numpy(np.ascontiguousarray(_to_uint8(images[mask], invert)))
    images = _resize(images, size)
    return ArrayDataset(
        images,
        labels[mask],
        name=os.path.basename(path),
        split=split if classes is not None else "all",
        transform=transform,
    )


NPZ = DataSource(
    "npz",
    load_npz,
    root="an .npz file (or its folder, with data.options.file) holding arrays 'images' "
    "(N, H, W) or (C, N, H, W) and 'labels' (N,) or (C, N); numpy.savez writes one",
    image_files=False,
    check_splits=("all",),
)


def load_digits_dataset(
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    classes: Sequence[int] | None = None,
    size: int | None = None,
    strict: bool = False,
) -> ArrayDataset:
    """scikit-learn's bundled digits (1,797 images 8 x 8, 10 classes), split zero-shot.

    Args:
        root: unused (nothing to download).
        split: "train" = digits 0-4 (901 images), "test" = digits 5-9 (896), "all".
        transform: applied to each (1, 8, 8) float tensor in [0, 1].
        classes: half-open range of digits overriding the split's.
        size: resize once at load time.
        strict: raise if the counts differ from 901 / 896.
    """
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS and classes is None:
        raise ValueError(f"digits: unknown split {split!r}; use one of {list(DIGITS_SPLITS)}")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    mask = _select_classes(labels, classes or DIGITS_SPLITS[split], "digits")
    pixels = np.rint(digits.images[mask] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    images = _resize(torch.from_numpy(pixels[:, None]), size)
    ds = ArrayDataset(images, labels[mask], name="digits", split=split, transform=transform)
    if classes is None:
        check_counts(ds, DIGITS.counts.get(split), strict=strict)
    return ds


DIGITS = DataSource(
    "digits",
    load_digits_dataset,
    root="",
    image_files=False,
    counts={"train": {"images": 901, "classes": 5}, "test": {"images": 896, "classes": 5}},
)
