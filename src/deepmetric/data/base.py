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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "NOT_AN_IMAGE",
    "WIDE_MODES",
    "DataSource",
    "DatasetCountWarning",
    "DatasetError",
    "ImageDataset",
    "MetricDataset",
    "MissingFileError",
    "RootRequiredError",
    "check_counts",
    "encode_labels",
    "open_image",
    "to_rgb",
    "to_tensor",
]


class DatasetError(ValueError):
    """A data set cannot be read correctly: the message names the file (and line) at fault."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file the layout needs is missing (also a :class:`FileNotFoundError`)."""


class DatasetCountWarning(UserWarning):
    """The number of images or classes differs from the official number."""


class RootRequiredError(DatasetError):
    """A data set that reads a folder or file was given no ``root``.

    ``name`` is the data set, ``expected`` what its root must name (from its
    :class:`DataSource`); the caller adds the key or flag that sets it."""

    def __init__(self, name: str, expected: str = "") -> None:
        self.name, self.expected = name, expected
        super().__init__(f"{name}: no root given" + (f"; expected {expected}" if expected else ""))


#: The problem of a file in which PIL recognises no image format (a text or HTML file
#: named ``x.jpg``); the callers name the file.
NOT_AN_IMAGE = "UnidentifiedImageError: not an image (no image format recognised in the file)"

#: PIL modes of more than 8 bits per pixel, which ``convert("RGB")`` would clip at 255 (a
#: 16-bit scan turns white): :func:`to_rgb` rescales them instead.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image in mode ``"RGB"`` (8 bits per channel).

    16-bit grey (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: 16-bit PNG and TIFF scans)
    is divided by 257 and rounded (0..65535 -> 0..255): one scale for every image, so
    brightness compares across images (12-bit data stored in 16 bits comes out dark, 0..16).
    Mode ``I`` (32-bit integers): values within 0..255 are kept, values within 0..65535 are
    divided by 257 as 16-bit data, any other range is stretched linearly from the image's
    minimum..maximum to 0..255. Every other mode: PIL's ``convert("RGB")``.
    """
    if image.mode not in WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)  # I;16B: big-endian, read as such
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif image.mode != "I" or (low >= 0 and high <= 65535):
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))  # high > low: outside 0..65535
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (decoding every pixel) and convert it to RGB (:func:`to_rgb`:
    16-bit images are rescaled, not clipped).

    Truncated files raise (nothing global such as ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set).

    Returns:
        A PIL image in mode ``"RGB"`` (H x W x 3, uint8).

    Raises:
        MissingFileError: the file does not exist.
        DatasetError: the file cannot be decoded, or is not an image; the message names it.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError as e:
        raise MissingFileError(f"image file not found: {path}") from e
    except UnidentifiedImageError as e:
        raise DatasetError(f"cannot read image {path}: {NOT_AN_IMAGE}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


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
            raise DatasetError(msg + " (--data.options.strict=true)")
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
    # How deepmetric split data that had no split of its own (see splits.split_unsplit)
    generated_split: dict[str, Any] | None = None
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

    def compact(self) -> MetricDataset:
        """A copy whose labels are re-indexed to the classes present (``class_ids`` and
        ``class_names`` follow); ``self`` when every class of the map is present."""
        present = torch.unique(self.labels)
        if present.numel() == self.num_classes:
            return self
        new = self.select(torch.ones(len(self), dtype=torch.bool))  # a subclass's copy
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[present] = torch.arange(present.numel())
        new.labels = remap[self.labels]
        new.class_ids = self.class_ids[present]
        new.class_names = [self.class_names[int(c)] for c in present]
        return new

    @property
    def num_classes(self) -> int:
        """C, the number of classes of the label map (classes 0..C-1)."""
        return int(self.class_ids.shape[0])

    def select(self, mask: torch.Tensor) -> MetricDataset:
        """A copy restricted to the rows where ``mask`` (N,) is true, keeping the label map."""
        raise NotImplementedError

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

    Construction opens no file: :func:`deepmetric.data.build_dataset` checks the files
    (``validate``: existence, headers, or a full decode) after the loader, see
    :mod:`deepmetric.data.integrity`. A file that turns out unreadable later raises a
    :class:`DatasetError` naming it.

    Args:
        paths: N image paths.
        raw_ids: N original class ids (ints, or strs such as In-Shop item ids).
        name, split: for messages and ``repr``.
        transform: callable applied to the PIL RGB image; None = to a (3, H, W) float tensor.
        is_query, is_gallery: optional N bools (query/gallery roles).
        super_ids: optional N original super-class ids (kept as ``super_labels``).
        universe: ids to build the label map from (joint query/gallery map); default raw_ids.
        id_parser: str id -> int class id (see :func:`encode_labels`).
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
    ) -> None:
        if len(paths) != len(raw_ids):
            raise ValueError(f"{len(paths)} paths but {len(raw_ids)} labels")
        if not paths:
            raise DatasetError(f"{name} {split}: no images")
        self.name, self.split, self.transform = name, split, transform
        self.paths = [os.fspath(p) for p in paths]
        self.bad_images: list[tuple[str, str]] = []  # (path, reason) dropped by validation
        self.labels, self.class_ids, self.class_names = encode_labels(
            list(raw_ids), universe=universe, id_parser=id_parser
        )
        if is_query is not None:
            self.is_query = torch.as_tensor(np.asarray(is_query, dtype=bool))
        if is_gallery is not None:
            self.is_gallery = torch.as_tensor(np.asarray(is_gallery, dtype=bool))
        if super_ids is not None:
            self.super_labels, self.super_class_ids, _ = encode_labels([int(s) for s in super_ids])

    def load_image(self, index: int) -> Image.Image:
        """The PIL RGB image ``index`` (raises :class:`DatasetError` naming a bad file and
        the flags that find and drop such files before training)."""
        try:
            return open_image(self.paths[index])
        except DatasetError as e:
            raise type(e)(
                f"{e}; find every such file before training with --data.validate=decode "
                "and drop them with --data.on_bad_image=skip"
            ) from None

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


@dataclass(frozen=True)
class DataSource:
    """Everything deepmetric knows about one data source, in one record beside its loader
    (``build_dataset``, ``check_dataset``, the config check, the CLI and the evaluation's
    Recall@K read it).

    ``load(root, split, transform, **options) -> MetricDataset`` is the loader; ``root`` says
    what ``root`` must name ("" when the source needs none); ``image_files`` is False for
    arrays held in memory (resized once at load time); ``official_split`` for benchmark
    splits a user cannot change; ``check_splits`` are the splits ``datasets check`` audits;
    ``recall_at`` are the K of Recall@K its papers report (``recall_at_source`` cites them);
    ``counts`` the official counts per split (``{"train": {"images": 5864, "classes": 100}}``),
    checked by the loader.
    """

    name: str
    load: Callable[..., MetricDataset]
    root: str
    aliases: tuple[str, ...] = ()
    image_files: bool = True
    official_split: bool = False
    check_splits: tuple[str, ...] = ("train", "test")
    recall_at: tuple[int, ...] = (1, 2, 4, 8)
    recall_at_source: str = ""
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
