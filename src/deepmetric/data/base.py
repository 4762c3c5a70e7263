"""Common machinery of every deepmetric data set.

A data set is a map-style :class:`torch.utils.data.Dataset` that yields ``(image, label)`` with
``image`` a tensor (after the transform) and ``label`` an int in ``0..C-1``. Its attributes:

- ``labels``: (N,) long tensor, contiguous ``0..C-1``, available without opening any image;
- ``class_ids``: (C,) long tensor, the original id of each contiguous class
  (``class_ids[labels[i]]`` is image i's original class id);
- ``class_names``: list of C str (the original id as text, a folder name, an item id ...);
- ``num_classes``: C;
- ``is_query`` / ``is_gallery``: (N,) bool tensors, or ``None`` when the data set has no
  query/gallery roles;
- ``role``: "query" / "gallery" for a query or gallery data set, else ``None``;
- ``super_labels``: (N,) long tensor of contiguous super-class labels, or ``None``;
- ``counts()``: a dict with ``images``, ``classes`` (and ``query_images``, ``gallery_images``,
  ``query_classes``, ``gallery_classes`` when roles exist).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetCountWarning",
    "DatasetError",
    "ImageDataset",
    "MetricDataset",
    "MissingFileError",
    "check_counts",
    "encode_labels",
    "open_image",
    "to_tensor",
]

ON_BAD_IMAGE = ("raise", "skip")


class DatasetError(ValueError):
    """A data set cannot be read correctly: the message names the file (and line) at fault."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the layout needs is missing (also a :class:`FileNotFoundError`)."""


class DatasetCountWarning(UserWarning):
    """The number of images or classes differs from the official number."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (decoding every pixel) and convert it to RGB.

    Truncated files raise (nothing global such as ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set).

    Returns:
        A PIL image in mode ``"RGB"`` (H x W x 3, uint8).

    Raises:
        MissingFileError: the file does not exist.
        DatasetError: the file cannot be decoded; the message names it.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise MissingFileError(f"image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _check_image(path: str) -> str | None:
    """Return None if ``path`` opens and decodes, else the reason it does not."""
    try:
        open_image(path)
    except DatasetError as e:
        return str(e)
    return None


def encode_labels(
    raw_ids: Sequence[Any],
    universe: Sequence[Any] | None = None,
    id_parser: Callable[[str], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Map original class ids to contiguous labels ``0..C-1`` in sorted id order.

    Args:
        raw_ids: N original ids, all ints or all strs.
        universe: the ids to index (default: the distinct ``raw_ids``); used to give query and
            gallery the same label map. Must contain every raw id.
        id_parser: for str ids, maps each distinct id to an int class id; when it raises
            ValueError for some id or is not one-to-one (and by default), the class ids are
            the ranks in sorted order.

    Returns:
        ``labels`` (N,) long, ``class_ids`` (C,) long, ``class_names`` (C,) list of str.
    """
    keys = sorted(set(raw_ids if universe is None else universe))
    index = {k: i for i, k in enumerate(keys)}
    labels = torch.tensor([index[r] for r in raw_ids], dtype=torch.long)
    if all(isinstance(k, (int, np.integer)) for k in keys):
        class_ids = torch.tensor([int(k) for k in keys], dtype=torch.long)
        names = [str(int(k)) for k in keys]
    else:
        names = [str(k) for k in keys]
        if id_parser is None:
            class_ids = torch.arange(len(keys), dtype=torch.long)
        else:
            try:
                parsed = [id_parser(k) for k in names]
            except ValueError:
                parsed = list(range(len(keys)))
            if len(set(parsed)) != len(parsed):  # never merge two classes into one id
                parsed = list(range(len(keys)))
            class_ids = torch.tensor(parsed, dtype=torch.long)
    return labels, class_ids, names


def _pretty(n: int) -> str:
    return f"{n:,}"


def check_counts(
    dataset: MetricDataset, official: dict[str, int] | None, *, strict: bool = False
) -> list[str]:
    """Compare ``dataset.counts()`` with official numbers.

    Args:
        dataset: the data set (its ``name`` and ``split`` appear in the message).
        official: e.g. ``{"images": 5864, "classes": 100}``; None = nothing to compare.
        strict: raise instead of warning.

    Returns:
        The list of differences (empty when everything matches).

    Raises:
        DatasetError: when ``strict`` and a number differs.
    """
    if not official:
        return []
    counts = dataset.counts()
    diffs = [
        f"{_pretty(counts[k])} {k.replace('_', ' ')} (official {_pretty(v)})"
        for k, v in official.items()
        if k in counts and counts[k] != v
    ]
    if diffs:
        msg = f"{dataset.name} {dataset.split}: " + ", ".join(diffs)
        if strict:
            raise DatasetError(msg + " (strict=True)")
        warnings.warn(msg, DatasetCountWarning, stacklevel=3)
    return diffs


class MetricDataset(Dataset):
    """Base class: subclasses fill the attributes described in the module docstring and
    implement :meth:`load_image`."""

    name: str = "dataset"
    split: str = "all"
    labels: torch.Tensor
    class_ids: torch.Tensor
    class_names: list[str]
    is_query: torch.Tensor | None = None
    is_gallery: torch.Tensor | None = None
    super_labels: torch.Tensor | None = None
    super_class_ids: torch.Tensor | None = None
    role: str | None = None  # "query" or "gallery" for a single-role view
    transform: Callable | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load_image(self, index: int) -> Any:
        """The untransformed image ``index`` (a PIL RGB image or a (C, H, W) float tensor)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        image = self.transform(image) if self.transform is not None else to_tensor(image)
        return image, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        """C, the number of classes of the label map (classes 0..C-1)."""
        return int(self.class_ids.shape[0])

    def counts(self) -> dict[str, int]:
        """Number of images and of distinct classes present (and per role when roles exist)."""
        out = {"images": len(self), "classes": int(torch.unique(self.labels).numel())}
        if self.is_query is not None and self.is_gallery is not None:
            for role, mask in (("query", self.is_query), ("gallery", self.is_gallery)):
                out[f"{role}_images"] = int(mask.sum())
                out[f"{role}_classes"] = int(torch.unique(self.labels[mask]).numel())
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:,}" for k, v in self.counts().items())
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {parts})"


def to_tensor(image: Any) -> torch.Tensor:
    """Default conversion: PIL (H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]; tensors pass."""
    if isinstance(image, torch.Tensor):
        return image
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(MetricDataset):
    """Images on disk, given as a list of paths and their original class ids.

    At construction every listed file must exist (``check_files``); with ``verify_images``
    (implied by ``on_bad_image="skip"``) every image is also opened and decoded once. Bad
    images either raise a :class:`DatasetError` naming them or, with ``on_bad_image="skip"``,
    are dropped with a warning giving their number (the list stays in ``bad_images``). By
    default images are only decoded in ``__getitem__``, where a bad one raises naming the file.

    Args:
        paths: N image paths.
        raw_ids: N original class ids (ints, or strs such as In-Shop item ids).
        name, split: for messages and ``repr``.
        transform: callable applied to the PIL RGB image; None = to a (3, H, W) float tensor.
        is_query, is_gallery: optional N bools (query/gallery roles).
        super_ids: optional N original super-class ids (kept as ``super_labels``).
        universe: ids to build the label map from (joint query/gallery map); default raw_ids.
        id_parser: str id -> int class id (see :func:`encode_labels`).
        on_bad_image: "raise" or "skip".
        verify_images: decode every image at construction.
        check_files: check at construction that every file exists.
        num_workers: threads used to verify images.
    """

    def __init__(
        self,
        paths: Sequence[str],
        raw_ids: Sequence[Any],
        *,
        name: str = "images",
        split: str = "all",
        transform: Callable | None = None,
        is_query: Sequence[bool] | None = None,
        is_gallery: Sequence[bool] | None = None,
        super_ids: Sequence[int] | None = None,
        universe: Sequence[Any] | None = None,
        id_parser: Callable[[str], int] | None = None,
        on_bad_image: str = "raise",
        verify_images: bool = False,
        check_files: bool = True,
        num_workers: int = 8,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if len(paths) != len(raw_ids):
            raise ValueError(f"{len(paths)} paths but {len(raw_ids)} labels")
        self.name, self.split, self.transform = name, split, transform
        paths = [os.fspath(p) for p in paths]
        keep = np.ones(len(paths), dtype=bool)
        self.bad_images: list[tuple[str, str]] = []

        if check_files or verify_images or on_bad_image == "skip":
            missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
            self._handle_bad(
                [(i, "missing file") for i in missing], paths, keep, on_bad_image, "missing"
            )
        if verify_images or on_bad_image == "skip":
            todo = np.flatnonzero(keep).tolist()
            with ThreadPoolExecutor(max(1, num_workers)) as pool:
                reasons = list(pool.map(_check_image, [paths[i] for i in todo]))
            bad = [(i, r) for i, r in zip(todo, reasons) if r is not None]
            self._handle_bad(bad, paths, keep, on_bad_image, "unreadable")

        idx = np.flatnonzero(keep)
        self.paths = [paths[i] for i in idx]
        raw_kept = [raw_ids[i] for i in idx]
        if not self.paths:
            raise DatasetError(f"{name} {split}: no images")
        if universe is not None:
            universe = sorted(set(universe) & set(raw_kept)) if self.bad_images else universe
        self.labels, self.class_ids, self.class_names = encode_labels(
            raw_kept, universe=universe, id_parser=id_parser
        )
        if is_query is not None:
            self.is_query = torch.as_tensor(np.asarray(is_query, dtype=bool)[idx])
        if is_gallery is not None:
            self.is_gallery = torch.as_tensor(np.asarray(is_gallery, dtype=bool)[idx])
        if super_ids is not None:
            self.super_labels, self.super_class_ids, _ = encode_labels(
                [int(super_ids[i]) for i in idx]
            )

    def _handle_bad(
        self,
        bad: list[tuple[int, str]],
        paths: list[str],
        keep: np.ndarray,
        on_bad_image: str,
        what: str,
    ) -> None:
        if not bad:
            return
        examples = "; ".join(f"{paths[i]} ({r})" for i, r in bad[:5])
        if on_bad_image == "raise":
            cls = MissingFileError if what == "missing" else DatasetError
            raise cls(
                f"{self.name} {self.split}: {len(bad):,} of {len(paths):,} images {what}, "
                f"e.g. {examples}; pass on_bad_image='skip' to drop them"
            )
        for i, r in bad:
            keep[i] = False
            self.bad_images.append((paths[i], r))
        warnings.warn(
            f"{self.name} {self.split}: skipped {len(bad):,} {what} images of {len(paths):,} "
            f"(e.g. {examples})",
            stacklevel=4,
        )

    def load_image(self, index: int) -> Image.Image:
        """The PIL RGB image ``index`` (raises :class:`DatasetError` naming a bad file)."""
        return open_image(self.paths[index])

    def select(self, mask: torch.Tensor | np.ndarray) -> ImageDataset:
        """A copy restricted to the rows where ``mask`` (N,) is true, keeping the label map
        (labels are not re-indexed: used for query/gallery views sharing one map)."""
        mask_np = np.asarray(mask, dtype=bool)
        idx = np.flatnonzero(mask_np)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.paths = [self.paths[i] for i in idx]
        t_idx = torch.as_tensor(idx, dtype=torch.long)
        new.labels = self.labels[t_idx]
        for attr in ("is_query", "is_gallery", "super_labels"):
            value = getattr(self, attr)
            if value is not None:
                setattr(new, attr, value[t_idx])
        return new

    def role_view(self, role: str) -> ImageDataset:
        """The "query" or "gallery" rows as their own data set (``role`` set, the label map
        shared with this data set; rows with both roles appear in both views)."""
        if role not in ("query", "gallery"):
            raise ValueError(f"role must be 'query' or 'gallery', got {role!r}")
        mask = self.is_query if role == "query" else self.is_gallery
        if mask is None or not bool(mask.any()):
            raise DatasetError(f"{self.name} {self.split}: no {role} rows")
        view = self.select(mask)
        view.is_query = view.is_gallery = None
        view.split = view.role = role
        return view


_INT_RE = re.compile(r"[+-]?\d+")


def parse_int(token: str, file: str | os.PathLike, line: int, what: str = "label") -> int:
    """Parse an integer field, raising a :class:`DatasetError` naming file and line."""
    token = token.strip()
    if not _INT_RE.fullmatch(token):
        raise DatasetError(f"{os.fspath(file)}, line {line}: {what} {token!r} is not an integer")
    return int(token)


def require_file(path: str | os.PathLike, hint: str = "") -> str:
    """Return ``path`` if it is a file, else raise :class:`MissingFileError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"file not found: {path}" + (f" ({hint})" if hint else ""))
    return path


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a UTF-8 text file."""
    path = require_file(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(n, s.strip()) for n, s in enumerate(f, start=1) if s.strip()]
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from e
