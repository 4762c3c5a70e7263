"""One split of a run's data, built from its :class:`~deepmetric.config.Config` and its
files checked before the first step: unreadable files (``data.validate``), leakage between
the training and the evaluation split, one image under two labels, and sizes that no
transform option makes equal (the first batch would fail)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepmetric import distributed as dist
from deepmetric.config import Config, ConfigError, where_set
from deepmetric.data import (
    DatasetError,
    ImageDataset,
    RootRequiredError,
    build_dataset,
    find_source,
    validate_images,
)
from deepmetric.data.integrity import (
    SplitAudit,
    audit_split,
    identical_files,
    relabelled_copies,
    unbatchable,
)

__all__ = [
    "CheckedSplit",
    "ImageSizeError",
    "build_split",
    "check_files",
    "check_root_exists",
    "checked_split",
    "data_name",
]


def data_name(cfg: Config) -> str:
    """``data.name=cub at ~/data/CUB_200_2011``: the data set as the user set it."""
    root = f" at {cfg.data.root}" if cfg.data.root else ""
    return f"data.name={cfg.data.name}{root}"


class ImageSizeError(ConfigError):
    """Images of one batch differ in size and no option resizes them.

    Raised while collating, possibly in a DataLoader worker; the DataLoader re-raises it in the
    main process with the worker's traceback as its message, of which the last line, ours,
    is kept."""

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def check_root_exists(cfg: Config) -> None:
    """ConfigError for a ``data.root`` that does not exist, naming where it was set, what
    the data source reads and, from ``data.about``, where the data comes from."""
    root = cfg.data.root
    if root is None or os.path.exists(os.path.expanduser(root)):
        return
    relative = "" if os.path.isabs(os.path.expanduser(root)) else f" (from {os.getcwd()})"
    source = find_source(cfg.data.name)
    about = f" This data: {cfg.data.about.strip()}." if cfg.data.about else ""
    raise ConfigError(
        f"{where_set(cfg, 'data.root')}: data.root: {root} does not exist{relative}; "
        f"{source.name} reads {source.root}.{about} Give its path with --data.root PATH"
    )


def build_split(
    cfg: Config, split: str, transform: Callable | None, options: dict[str, Any], validate: str
) -> Any:
    """One split of ``data.name``, its image files checked at level ``validate``; data
    without a split of its own split by ``data.split_by`` ...; array data sets resized once
    at load time to ``data.transform_options.size`` (the transform has nothing left to
    resize)."""
    data = cfg.data
    source = find_source(data.name)
    check_root_exists(cfg)
    options = {**data.options, **options}
    if not source.image_files and "size" in data.transform_options:
        options["size"] = data.transform_options["size"]
    try:
        return build_dataset(
            data.name,
            data.root,
            split,
            transform,
            validate=validate,
            on_bad_image=data.on_bad_image,
            test_classes=data.test_classes,
            test_images=data.test_images,
            split_by=data.split_by,
            split_seed=data.split_seed,
            progress=cfg.train.progress and dist.is_main_process(),
            **options,
        )
    except RootRequiredError as e:  # the loader says what the root is, we add the key
        raise ConfigError(
            f"data.root is not set: {e.name} reads {e.expected}; give it with "
            "--data.root PATH (or data.root in the config)"
        ) from None
    except DatasetError:  # names the file and line itself
        raise
    except ValueError as e:  # an option value the loader rejects
        raise ConfigError(f"data ({data.name}, split {split!r}): {e}") from None


@dataclass
class CheckedSplit:
    """One split of a run: its data set, the transform it is read with, and what checking its
    files found (``audit``: None at ``data.validate=none`` and for array data)."""

    name: str  # "train", "test" or "val"
    dataset: Any
    transform: Callable
    audit: Any = None  # deepmetric.data.integrity.SplitAudit of the files kept


def checked_split(
    cfg: Config,
    name: str,
    split: str,
    transform: Callable,
    options: dict[str, Any],
    *,
    digest: bool = True,
) -> CheckedSplit:
    """:func:`build_split`, its image files checked at ``data.validate`` (bad ones raise or
    are skipped, ``data.on_bad_image``) and, with ``digest``, hashed (sha256) in the same
    single read of each file, for :func:`check_files`."""
    level = cfg.data.validate
    if level == "none":
        return CheckedSplit(name, build_split(cfg, split, transform, options, "none"), transform)
    dataset = build_split(cfg, split, transform, options, "none")
    if not isinstance(dataset, ImageDataset):
        return CheckedSplit(name, dataset, transform)
    progress = cfg.train.progress and dist.is_main_process()
    audit = audit_split(name, dataset, level, progress=progress, digest=digest)
    kept = validate_images(dataset, level, cfg.data.on_bad_image, infos=audit.infos)
    readable = [i for i in audit.infos if i.problem is None]  # in the order of kept.paths
    return CheckedSplit(name, kept, transform, SplitAudit(name, kept, readable))


def check_files(cfg: Config, splits: list[CheckedSplit]) -> None:
    """What the files of a run's splits say before the first step (nothing at
    ``data.validate=none``):

    - byte-identical files in the training split and an evaluation split: a DatasetError
      (leakage inflates the metrics), a warning for an official benchmark split or with
      ``data.allow_leakage``;
    - byte-identical files under two labels within one split: a warning;
    - images the split's transform leaves at different sizes: :class:`ImageSizeError` (the
      first batch would fail).
    """
    audits = [s.audit for s in splits if s.audit is not None]
    if not audits:
        return
    across = identical_files(audits)[1]
    if across:
        others = " and ".join(sorted({a.name for a in audits} - {"train"}))
        what = (
            f"{len(across):,} byte-identical file{'s' if len(across) > 1 else ''} in both the "
            f"train and the {others} split of {data_name(cfg)}, e.g. {' = '.join(across[0][:3])}"
        )
        if find_source(cfg.data.name).official_split:
            warnings.warn(f"{what} (the official split: reported, not an error)", stacklevel=3)
        elif cfg.data.allow_leakage:
            warnings.warn(f"{what} (data.allow_leakage=true: training anyway)", stacklevel=3)
        else:
            raise DatasetError(
                f"{what}: images seen in training would inflate the evaluation (leakage); "
                "remove the copies (deepmetric datasets check lists them all) or set "
                "--data.allow_leakage=true to train anyway"
            )
    copies = relabelled_copies(audits)
    if copies:
        examples = "; ".join(" = ".join(f"{p} ({label})" for p, label in g) for g in copies[:3])
        warnings.warn(
            f"{len(copies):,} image{'s' if len(copies) > 1 else ''} of {data_name(cfg)} "
            f"listed under two labels (byte-identical files whose labels differ; one label is "
            f"likely wrong): {examples}",
            stacklevel=3,
        )
    for s in splits:
        if s.audit is None:
            continue
        odd, common = unbatchable(s.audit.infos, s.transform)
        if odd:
            side = max(max(i.size) for i in (*odd, common))
            raise ImageSizeError(
                f"images of different sizes in the {s.name} split of {data_name(cfg)} "
                f"({odd[0].path} is {odd[0].size[0]}x{odd[0].size[1]}, {common.path} "
                f"{common.size[0]}x{common.size[1]}; {len(odd):,} of {len(s.audit.infos):,} "
                "differ from the most common size) and the transform does not resize them, "
                "so a batch cannot hold both: set --data.transform_options.size (e.g. "
                f"--data.transform_options.size={side}) to resize every image to that square"
            )
