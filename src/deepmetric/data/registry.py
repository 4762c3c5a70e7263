"""``build_dataset`` registry, the query/gallery helper and ``check_dataset``."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .arrays import load_digits_dataset, load_npz
from .base import DatasetCountWarning, DatasetError, ImageDataset, MetricDataset
from .benchmarks import load_cars196, load_cub, load_inshop, load_sop
from .generic import load_csv, load_folder, load_list
from .transforms import build_transform

__all__ = [
    "DATASETS",
    "CheckReport",
    "build_dataset",
    "build_query_gallery",
    "canonical_name",
    "check_dataset",
    "is_array_format",
    "loader_options",
]

DATASETS: dict[str, Callable[..., MetricDataset]] = {
    "cub": load_cub,
    "cars196": load_cars196,
    "sop": load_sop,
    "inshop": load_inshop,
    "list": load_list,
    "folder": load_folder,
    "csv": load_csv,
    "npz": load_npz,
    "digits": load_digits_dataset,
}
ALIASES = {
    "cub200": "cub",
    "cub-200-2011": "cub",
    "cars": "cars196",
    "in-shop": "inshop",
    "stanford_online_products": "sop",
}
IMAGE_FORMATS = ("cub", "cars196", "sop", "inshop", "list", "folder", "csv")
CHECK_SPLITS = {
    "cub": ("train", "test"),
    "cars196": ("train", "test"),
    "sop": ("train", "test"),
    "inshop": ("train", "test"),
    "digits": ("train", "test"),
    "npz": ("all",),
    "list": ("train", "test"),
    "folder": ("train", "test"),
    "csv": ("train", "test"),
}


def canonical_name(name: str) -> str:
    """The registry key of a data set name or alias (``"CUB200"`` -> ``"cub"``); ValueError
    listing the choices for an unknown name."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; use one of {sorted(DATASETS)}")
    return key


def is_array_format(name: str) -> bool:
    """True for the in-memory array formats (npz, digits), which resize once at load time."""
    return canonical_name(name) not in IMAGE_FORMATS


def loader_options(name: str) -> tuple[str, ...]:
    """The keyword options the loader of data set ``name`` accepts (after root, split and
    transform)."""
    params = list(inspect.signature(DATASETS[canonical_name(name)]).parameters.values())
    return tuple(p.name for p in params[3:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | str | None = None,
    **options: Any,
) -> MetricDataset:
    """Build a data set by name.

    Args:
        name: cub, cars196, sop, inshop, list, folder, csv, npz, digits.
        root: its folder (or file, for csv and npz); None for digits.
        split: "train", "test"; inshop, csv and list also "query" and "gallery" (one label
            map shared by both); npz ignores it (select with ``classes=(first, end)``).
        transform: a callable, a preset name ("bninception", "imagenet", "small", built with
            ``train = split == "train"``), or None (plain tensors).
        **options: passed to the loader, e.g. ``strict``, ``on_bad_image``, ``verify_images``
            (image formats), ``classes``, ``invert``, ``size`` (npz / digits).

    Returns:
        A data set yielding ``(image tensor, label)`` with ``labels``, ``class_ids``,
        ``num_classes`` and ``counts()``.
    """
    key = canonical_name(name)
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
    if isinstance(transform, str):
        transform = build_transform(transform, train=split == "train")
    return DATASETS[key](root, split, transform, **options)


def build_query_gallery(
    name: str,
    root: str | os.PathLike | None = None,
    transform: Callable | str | None = None,
    **options: Any,
) -> tuple[MetricDataset, MetricDataset]:
    """The query and gallery data sets of a query-vs-gallery benchmark (inshop, csv, list),
    sharing one label map (``query.labels`` and ``gallery.labels`` index the same
    ``class_ids``). Images that are both query and gallery appear in both.

    Raises:
        ValueError: the data set has no query/gallery roles (e.g. cub: test vs itself).
    """
    test = build_dataset(name, root, "test", transform, **options)
    if test.is_query is None or test.is_gallery is None or not isinstance(test, ImageDataset):
        raise ValueError(
            f"{name}: no query/gallery roles; its test split is compared with "
            "itself (leave-one-out)"
        )
    return test.role_view("query"), test.role_view("gallery")


class CheckReport(str):
    """The text of a data-set check; ``ok`` is False when a problem was found."""

    ok: bool = True


def check_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] | None = None,
    **options: Any,
) -> CheckReport:
    """Validate a layout: annotation files parse, every image exists and decodes, counts match
    the official ones. Opens every image (minutes for SOP).

    Args:
        name: as for :func:`build_dataset`.
        root: the data set's root.
        splits: the splits to check, a name or a list (default: train and test; npz: all).
        **options: loader options (e.g. ``list_file``, ``csv_file``).

    Returns:
        A :class:`CheckReport`: a str (one line per finding, last line "result: OK" or
        "result: N problem(s)") with an ``ok`` attribute.
    """
    key = canonical_name(name)
    lines = [f"check {key} at {os.fspath(root) if root is not None else '(built in)'}"]
    problems = 0
    if key in IMAGE_FORMATS:
        options = {**options, "on_bad_image": "skip"}
    if isinstance(splits, str):
        splits = [splits]
    for split in splits or CHECK_SPLITS[key]:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = build_dataset(key, root, split, **options)
            except (DatasetError, ValueError, OSError) as e:
                lines.append(f"  {split}: ERROR {e}")
                problems += 1
                continue
        counts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in ds.counts().items())
        lines.append(f"  {split}: {counts} ({time.perf_counter() - start:.1f} s)")
        for w in caught:
            if issubclass(w.category, DatasetCountWarning):
                lines.append(f"    counts differ from the official ones: {w.message}")
            else:
                lines.append(f"    warning: {w.message}")
            problems += 1
        for path, reason in getattr(ds, "bad_images", [])[:20]:
            lines.append(f"    bad image: {path}: {reason}")
    lines.append("result: OK" if problems == 0 else f"result: {problems} problem(s)")
    report = CheckReport("\n".join(lines))
    report.ok = problems == 0
    return report
