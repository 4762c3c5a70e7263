"""Image files you can trust: the checks run before training (``data.validate``) and the
full audit of ``deepmetric datasets check`` (content hashes, leakage, a summary).

Levels of :func:`inspect_image`:

- ``none``: the file exists;
- ``header``: also its header parses (format, size, mode) and, for JPEG and PNG, the file ends
  with the format's end marker (JPEG EOI ``FF D9``, PNG ``IEND``), which catches truncated
  files without decoding them;
- ``decode``: also every pixel decodes.

Beyond single files: byte-identical files (:func:`identical_files`, and those under two labels,
:func:`relabelled_copies`) and images a batch cannot hold together (:func:`unbatchable`: sizes
that the transform keeps).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .base import NOT_AN_IMAGE, WIDE_MODES, DatasetError, ImageDataset, MissingFileError

__all__ = [
    "ON_BAD_IMAGE",
    "VALIDATE_LEVELS",
    "ImageInfo",
    "SplitAudit",
    "audit_split",
    "identical_files",
    "inspect_image",
    "inspect_images",
    "relabelled_copies",
    "unbatchable",
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
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        info.problem = NOT_AN_IMAGE
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

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: inspect_image(p, level, digest), paths, chunksize=64)
        bar = tqdm(results, total=len(paths), desc=desc, disable=not progress, unit="img")
        return list(bar)


def validate_images(
    ds: ImageDataset,
    level: str = "header",
    on_bad_image: str = "raise",
    *,
    progress: bool = False,
    infos: Sequence[ImageInfo] | None = None,
) -> ImageDataset:
    """Check every file of ``ds`` at ``level`` before it is used (``infos``: what
    :func:`inspect_images` or :func:`audit_split` already found, one per path of ``ds``, so
    that no file is read twice).

    Returns ``ds`` when all pass; with ``on_bad_image="skip"`` a copy without the bad files
    (listed in ``bad_images``, a warning gives their number; labels re-indexed unless ``ds``
    is a query or gallery view sharing a label map).

    Raises:
        MissingFileError / DatasetError: with ``on_bad_image="raise"``, naming the first bad
            files, their number and the flag that skips them.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be raise or skip, got {on_bad_image!r}")
    if infos is None:
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
        """The files that cannot be used: unreadable ones and, when the data set has a
        transform, images it leaves at another size than most (a batch holds one size;
        see :func:`unbatchable`)."""
        bad = [i for i in self.infos if i.problem is not None]
        if self.dataset.transform is None:
            return bad
        readable = [i for i in self.infos if i.problem is None]
        odd, common = unbatchable(readable, self.dataset.transform)
        if odd:
            fix = _size_fix([*odd, common])
            bad += [
                replace(
                    i,
                    problem=f"{_wxh(i.size)} pixels where most images are "
                    f"{_wxh(common.size)}, and the transform keeps sizes: a batch holds one "
                    f"size; {fix}",
                )
                for i in odd
            ]
        return bad

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
        wide = [i for i in good if i.mode in WIDE_MODES]
        if wide:
            lines.append(
                f"warning: {len(wide):,} images of 16 or 32-bit pixels ("
                f"{_tally(i.mode for i in wide)}), rescaled to 8 bits when loaded (16-bit "
                f"values / 257, not clipped at 255; see deepmetric.data.to_rgb), e.g. "
                f"{wide[0].path}"
            )
        if ds.transform is None:  # no transform to ask: sizes that differ may break batches
            odd, common = unbatchable(good, None)
            if odd:
                lines.append(
                    f"warning: images of {len({i.size for i in good}):,} sizes, e.g. "
                    f"{odd[0].path} ({_wxh(odd[0].size)}) and {common.path} "
                    f"({_wxh(common.size)}): a batch holds one size, so training needs a "
                    "transform that resizes (presets bninception, imagenet, inception do; "
                    f"small only with a size): {_size_fix([*odd, common])}"
                )
        return lines


def _wxh(size: tuple[int, int] | None) -> str:
    return "{}x{}".format(*size) if size else "?"


def _size_fix(infos: Sequence[ImageInfo]) -> str:
    side = max(max(i.size) for i in infos if i.size)
    return f"set --data.transform_options.size (e.g. --data.transform_options.size={side})"


def _output_shape(transform: Callable, size: tuple[int, int]) -> tuple[int, ...]:
    """The shape ``transform`` gives a blank RGB image of ``size`` (w, h); the global RNG
    that random augmentations draw from is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return tuple(transform(Image.new("RGB", size)).shape)


def unbatchable(
    infos: Sequence[ImageInfo], transform: Callable | None
) -> tuple[list[ImageInfo], ImageInfo | None]:
    """Images a batch cannot hold with the others: (those whose size, after ``transform``,
    differs from what the most common image size gives; one file of that common size), or
    ``([], None)`` when every image gets one shape.

    ``transform`` None: the images as they are (every other size is odd). Otherwise it is
    tried on blank images of the most common, smallest, largest, widest and tallest sizes:
    when they all come out in one shape the transform resizes (nothing is odd), else every
    image of another size than the most common one is odd. Files without a known size (not
    read, or unreadable) are ignored.
    """
    sized = [i for i in infos if i.size is not None]
    counts = Counter(i.size for i in sized)
    if len(counts) < 2:
        return [], None
    common = counts.most_common(1)[0][0]
    if transform is not None:
        sizes = list(counts)
        tried = {
            common,
            min(sizes, key=lambda s: s[0] * s[1]),
            max(sizes, key=lambda s: s[0] * s[1]),
            min(sizes, key=lambda s: s[0] / max(s[1], 1)),
            max(sizes, key=lambda s: s[0] / max(s[1], 1)),
        }
        if len({_output_shape(transform, s) for s in tried}) == 1:
            return [], None
    odd = [i for i in sized if i.size != common]
    return odd, next(i for i in sized if i.size == common)


def _tally(values: Iterable[str | None]) -> str:
    counts = Counter(v or "?" for v in values)
    return ", ".join(f"{k} {n:,}" for k, n in counts.most_common())


def audit_split(
    name: str,
    ds: ImageDataset,
    level: str = "header",
    *,
    progress: bool = False,
    digest: bool = True,
) -> SplitAudit:
    """Inspect every file of one split at ``level`` and, with ``digest``, hash it (sha256),
    reading each file once (see :func:`inspect_images`)."""
    infos = inspect_images(
        ds.paths, level, digest=digest, progress=progress and len(ds) >= 1000, desc=name
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


def relabelled_copies(audits: Sequence[SplitAudit]) -> list[list[tuple[str, str]]]:
    """Byte-identical files within one split listed under different classes (the same image
    with two labels: one of them is likely wrong): per group, (path, class name) of each."""
    groups = []
    for audit in audits:
        ds = audit.dataset
        label = dict(zip(ds.paths, (ds.class_names[c] for c in ds.labels.tolist())))
        for paths in identical_files([audit])[0]:
            if len({label[p] for p in paths}) > 1:
                groups.append([(p, label[p]) for p in paths])
    return groups
