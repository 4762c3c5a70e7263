"""``build_dataset`` registry, the query/gallery helper and ``check_dataset``."""

from __future__ import annotations

import difflib
import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .arrays import DIGITS, NPZ
from .base import (
    DatasetCountWarning,
    DatasetError,
    DataSource,
    ImageDataset,
    MetricDataset,
    RootRequiredError,
)
from .benchmarks import CARS196, CUB, INSHOP, SOP
from .generic import CSV, FOLDER, LIST
from .integrity import audit_split, identical_files, validate_images
from .splits import describe_split, split_unsplit
from .transforms import build_transform

__all__ = [
    "SOURCES",
    "CheckReport",
    "build_dataset",
    "build_query_gallery",
    "check_dataset",
    "find_source",
    "loader_options",
]

#: Every data source by name, its record beside its loader (``DataSource``: aliases, image
#: files or arrays, official split, splits to check, its papers' Recall@K, official counts).
SOURCES: dict[str, DataSource] = {
    s.name: s for s in (CUB, CARS196, SOP, INSHOP, LIST, FOLDER, CSV, NPZ, DIGITS)
}


def find_source(name: str) -> DataSource:
    """The record of a data set name or alias, any case (``"CUB200"`` -> cub's); ValueError
    listing the choices for an unknown name."""
    key = name.lower()
    for source in SOURCES.values():
        if key == source.name or key in source.aliases:
            return source
    close = difflib.get_close_matches(
        key, [*SOURCES, *(a for s in SOURCES.values() for a in s.aliases)], n=1
    )
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown data set {name!r}{hint}; use one of {', '.join(SOURCES)}")


def loader_options(name: str) -> tuple[str, ...]:
    """The keyword options the loader of data set ``name`` accepts (after root, split and
    transform)."""
    params = list(inspect.signature(find_source(name).load).parameters.values())
    return tuple(p.name for p in params[3:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | str | None = None,
    *,
    validate: str = "none",
    on_bad_image: str = "raise",
    test_classes: float | int | None = None,
    test_images: float = 0.5,
    split_by: str = "classes",
    split_seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> MetricDataset:
    """Build a data set by name.

    Args:
        name: a key of :data:`SOURCES` (cub, cars196, sop, inshop, list, folder, csv, npz,
            digits) or one of its aliases, any case.
        root: its folder (or file, for csv and npz); None for digits.
        split: "train", "test"; inshop, csv and list also "query" and "gallery" (one label
            map shared by both); "all" for data without a split; npz ignores it (select with
            ``classes=(first, end)``).
        transform: a callable, a preset name ("bninception", "imagenet", "small", built with
            ``train = split == "train"``), or None (plain tensors).
        validate: image files: "none" (they exist), "header" (headers parse, no truncated
            JPEG/PNG) or "decode" (every pixel decodes), checked in parallel threads.
        on_bad_image: "raise" (DatasetError naming the files) or "skip" (drop, with a warning).
        test_classes, test_images, split_by, split_seed: how data without a split of its own
            (a flat folder, a CSV without a ``split`` column, one list file) is split, see
            :func:`~deepmetric.data.splits.split_unsplit`; an error for data with a split.
        progress: a progress bar while validating (large sets).
        **options: passed to the loader, e.g. ``strict``, ``list_file``, ``csv_file``
            (image formats), ``classes``, ``invert``, ``size`` (npz / digits).

    Returns:
        A data set yielding ``(image tensor, label)`` with ``labels``, ``class_ids``,
        ``num_classes`` and ``counts()``.
    """
    source = find_source(name)
    key = source.name
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
    if isinstance(transform, str):
        transform = build_transform(transform, train=split == "train")
    ds = source.load(root, split, transform, **options)
    rule_given = test_classes is not None or split_by != "classes"
    if ds.split == "all" and split != "all":
        part = "test" if split in ("query", "gallery") else split  # roles: of the test part
        ds = split_unsplit(
            ds,
            part,
            test_classes=test_classes,
            test_images=test_images,
            split_by=split_by,
            seed=split_seed,
        )
        if split in ("query", "gallery"):
            ds = ds.role_view(split)
    elif rule_given:
        raise ValueError(
            f"{key}: test_classes / split_by apply to data without a split of its own; "
            f"{root or key} has a {split} split"
        )
    if isinstance(ds, ImageDataset):
        ds = validate_images(ds, validate, on_bad_image, progress=progress)
    return ds


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
    """The text of a data-set check; ``ok`` is False when a problem was found (unreadable
    or missing files, conflicting or repeated rows, files shared by train and test, counts
    that differ from the official ones). Warnings (identical files within a split, classes
    with one image) do not make it fail."""

    ok: bool = True


def check_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] | None = None,
    validate: str = "header",
    progress: bool = False,
    test_classes: float | int | None = None,
    test_images: float = 0.5,
    split_by: str = "classes",
    split_seed: int = 0,
    **options: Any,
) -> CheckReport:
    """Audit a data set: annotation files parse, no image is listed twice or with two labels,
    every image exists and passes ``validate`` ("header": headers and end markers, the
    default; "decode": every pixel), no byte-identical file is in both train and test
    (sha256 of every file), counts match the official ones; plus a summary per split (images
    per class, single-image classes, image sizes, modes). Files are read in parallel threads.

    Args:
        name, root: as for :func:`build_dataset`; data without a split of its own is split
            with ``test_classes`` ... ``split_seed`` as a training run would.
        splits: the splits to check, a name or a list (default: train and test; npz: all).
        **options: loader options (e.g. ``list_file``, ``csv_file``).

    Raises:
        RootRequiredError: the source reads a folder or file and ``root`` is None.

    Returns:
        A :class:`CheckReport`: a str (one line per finding, last line "result: OK" or
        "result: N problem(s)") with an ``ok`` attribute.
    """
    source = find_source(name)
    key = source.name
    lines = [f"check {key} at {os.fspath(root) if root is not None else '(built in)'}"]
    problems = warned = 0
    rule = {
        "test_classes": test_classes,
        "test_images": test_images,
        "split_by": split_by,
        "split_seed": split_seed,
    }
    if isinstance(splits, str):
        splits = [splits]
    audits = []
    for split in splits or source.check_splits:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = build_dataset(key, root, split, **rule, **options)
            except RootRequiredError:  # no split can be read: the caller names the flag
                raise
            except (DatasetError, ValueError, OSError) as e:
                lines.append(f"  {split}: ERROR {e}")
                problems += 1
                continue
        rule_of = getattr(ds, "generated_split", None)
        if rule_of and not audits:
            lines.append(f"  no split of its own, split as a run would: {describe_split(rule_of)}")
        counts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in ds.counts().items())
        lines.append(f"  {split}: {counts}")
        for w in caught:
            if issubclass(w.category, DatasetCountWarning):
                lines.append(f"    counts differ from the official ones: {w.message}")
                problems += 1
            else:
                lines.append(f"    warning: {w.message}")
                warned += 1
        if not isinstance(ds, ImageDataset):
            continue
        audit = audit_split(split, ds, validate, progress=progress)
        audits.append(audit)
        for text in audit.summary():
            lines.append(f"    {text}")
            warned += text.startswith("warning")
        bad = audit.bad()
        if bad:
            problems += 1
            lines.append(f"    {len(bad):,} unusable images:")
            lines += [f"      {i.path}: {i.problem}" for i in bad[:20]]
            if len(bad) > 20:
                lines.append(f"      ... and {len(bad) - 20:,} more")
        lines.append(f"    ({time.perf_counter() - start:.1f} s)")
    within, across = identical_files(audits)
    if within:
        warned += 1
        n_files = sum(len(g) for g in within)
        lines.append(
            f"  warning: {len(within):,} groups of byte-identical files within a split "
            f"({n_files:,} files), e.g. {' = '.join(within[0][:3])}"
        )
    if across:
        official = source.official_split
        lines.append(
            f"  {'warning' if official else 'LEAKAGE'}: {len(across):,} byte-identical files "
            f"in more than one split, e.g. {' = '.join(across[0][:3])}"
            + (" (the official split: reported, not an error)" if official else "")
        )
        problems += not official
        warned += official
    tail = f", {warned} warning(s)" if warned else ""
    lines.append(("result: OK" if problems == 0 else f"result: {problems} problem(s)") + tail)
    report = CheckReport("\n".join(lines))
    report.ok = problems == 0
    return report
