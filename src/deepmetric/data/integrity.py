"""Image files you can trust: the checks run before training (``data.validate``) and the
full audit of ``deepmetric datasets check`` (content hashes, leakage, a summary).

Levels of :func:`inspect_image`:

- ``none``: the file exists;
- ``header``: also its header parses (format, size, mode) and, for JPEG and PNG, the file ends
  with the format's end marker (JPEG EOI ``FF D9``, PNG ``IEND``), which catches truncated
  files without decoding them;
- ``decode``: also every pixel decodes.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .base import DatasetError, ImageDataset, MissingFileError

__all__ = [
    "ON_BAD_IMAGE",
    "VALIDATE_LEVELS",
    "ImageInfo",
    "SplitAudit",
    "audit_split",
    "identical_files",
    "inspect_image",
    "inspect_images",
    "validate_images",
]

VALIDATE_LEVELS = ("none", "header", "decode")
ON_BAD_IMAGE = ("raise", "skip")
_TAIL = 1024  # bytes searched for the end marker (JPEGs may carry padding after EOI)
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


@dataclass
class ImageInfo:
    """What :func:`inspect_image` found about one file."""

    path: str
    problem: str | None = None  # None when the file passed the checks
    format: str | None = None  # PIL's format name (JPEG, PNG ...)
    size: tuple[int, int] | None = None  # (width, height) in pixels
    mode: str | None = None  # PIL mode (RGB, L, RGBA ...)
    digest: str | None = None  # sha256 of the file's bytes (when hashed)


def inspect_image(path: str, level: str = "header", digest: bool = False) -> ImageInfo:
    """Check one image file at ``level`` (see the module docstring); ``digest`` also hashes
    its bytes (sha256), reading the file once for both."""
    info = ImageInfo(path)
    try:
        if level == "none" and not digest:
            if not os.path.isfile(path):
                info.problem = "missing file"
            return info
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        info.problem = "missing file"
        return info
    except OSError as e:
        info.problem = f"cannot read: {e.strerror or e}"
        return info
    if digest:
        info.digest = hashlib.sha256(data).hexdigest()
    if level == "none":
        return info
    if not data:
        info.problem = "empty file"
        return info
    try:
        with Image.open(io.BytesIO(data)) as im:
            info.format, info.size, info.mode = im.format, im.size, im.mode
            marker = _END_MARKERS.get(im.format or "")
            if marker is not None and marker not in data[-_TAIL:]:
                info.problem = f"truncated {im.format} file (no end marker)"
            elif level == "decode":
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        info.problem = f"{type(e).__name__}: {e}"
    return info


def inspect_images(
    paths: Sequence[str],
    level: str = "header",
    *,
    digest: bool = False,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "checking images",
) -> list[ImageInfo]:
    """:func:`inspect_image` for every path, in parallel threads (file reads, hashing and
    decoding release the GIL), in input order; a progress bar on stderr with ``progress``."""
    if level not in VALIDATE_LEVELS:
        raise ValueError(f"validate must be one of {', '.join(VALIDATE_LEVELS)}, got {level!r}")
    if level == "none" and not digest:  # a stat per file: faster without threads
        return [inspect_image(p, "none") for p in paths]
    from tqdm import tqdm

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: inspect_image(p, level, digest), paths, chunksize=64)
        bar = tqdm(results, total=len(paths), desc=desc, disable=not progress, unit="img")
        return list(bar)


def validate_images(
    ds: ImageDataset, level: str = "header", on_bad_image: str = "raise", *, progress: bool = False
) -> ImageDataset:
    """Check every file of ``ds`` at ``level`` before it is used.

    Returns ``ds`` when all pass; with ``on_bad_image="skip"`` a copy without the bad files
    (listed in ``bad_images``, a warning gives their number; labels re-indexed unless ``ds``
    is a query or gallery view sharing a label map).

    Raises:
        MissingFileError / DatasetError: with ``on_bad_image="raise"``, naming the first bad
            files, their number and the flag that skips them.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be raise or skip, got {on_bad_image!r}")
    infos = inspect_images(ds.paths, level, progress=progress and len(ds) >= 2000)
    bad = [(i, info.problem) for i, info in enumerate(infos) if info.problem is not None]
    if not bad:
        return ds
    examples = "; ".join(f"{ds.paths[i]} ({why})" for i, why in bad[:3])
    what = f"{len(bad):,} of {len(ds):,} images of {ds.name} {ds.split}"
    if on_bad_image == "raise":
        all_missing = all(why == "missing file" for _, why in bad)
        cls = MissingFileError if all_missing else DatasetError
        raise cls(
            f"{what} {'are missing' if all_missing else 'cannot be used'}: {examples}; "
            "fix or remove them, or add --data.on_bad_image=skip to train without them"
        )
    keep = np.ones(len(ds), dtype=bool)
    keep[[i for i, _ in bad]] = False
    if not keep.any():
        raise DatasetError(f"{what} cannot be used (all of them): {examples}")
    warnings.warn(f"skipped {what} (--data.on_bad_image=skip): {examples}", stacklevel=2)
    kept = ds.select(torch.as_tensor(keep))
    kept.bad_images = list(ds.bad_images) + [(ds.paths[i], why) for i, why in bad]
    return kept if ds.role is not None else kept.compact()


@dataclass
class SplitAudit:
    """What :func:`audit_split` found in one split: per-file results and the summary."""

    name: str
    dataset: ImageDataset
    infos: list[ImageInfo]

    def bad(self) -> list[ImageInfo]:
        return [i for i in self.infos if i.problem is not None]

    def summary(self) -> list[str]:
        """Images per class (min / median / max), single-image classes, sizes, modes."""
        ds = self.dataset
        per_class = np.bincount(ds.labels.numpy(), minlength=ds.num_classes)
        lines = [
            f"images per class: min {per_class.min()}, median {np.median(per_class):g}, "
            f"max {per_class.max()}"
        ]
        single = np.flatnonzero(per_class == 1)
        if single.size:
            names = ", ".join(ds.class_names[c] for c in single[:5])
            lines.append(
                f"warning: {single.size:,} classes with a single image (no positive pair to "
                f"train or retrieve), e.g. {names}"
            )
        good = [i for i in self.infos if i.size is not None]
        if good:
            areas = np.array([w * h for w, h in (i.size for i in good)])
            order = np.argsort(areas, kind="stable")
            smallest, median, largest = (good[order[j]].size for j in (0, len(good) // 2, -1))
            lines.append(
                "image sizes (w x h): smallest {}x{}, median {}x{}, largest {}x{}".format(
                    *smallest, *median, *largest
                )
            )
            lines.append(
                f"modes: {_tally(i.mode for i in good)}; formats: {_tally(i.format for i in good)}"
            )
        return lines


def _tally(values: Iterable[str | None]) -> str:
    counts = Counter(v or "?" for v in values)
    return ", ".join(f"{k} {n:,}" for k, n in counts.most_common())


def audit_split(
    name: str, ds: ImageDataset, level: str = "header", *, progress: bool = False
) -> SplitAudit:
    """Inspect and hash every file of one split (see :func:`inspect_images`)."""
    infos = inspect_images(
        ds.paths, level, digest=True, progress=progress and len(ds) >= 1000, desc=name
    )
    return SplitAudit(name, ds, infos)


def identical_files(audits: Sequence[SplitAudit]) -> tuple[list[list[str]], list[list[str]]]:
    """Byte-identical files (same sha256): (groups within one split, groups spanning splits);
    each group lists its paths, prefixed by their split when it spans several."""
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for audit in audits:
        for info in audit.infos:
            if info.digest is not None:
                by_digest.setdefault(info.digest, []).append((audit.name, info.path))
    within, across = [], []
    for members in by_digest.values():
        if len(members) < 2:
            continue
        splits = {s for s, _ in members}
        if len(splits) > 1:
            across.append([f"{s}:{p}" for s, p in members])
        else:
            within.append([p for _, p in members])
    return within, across
