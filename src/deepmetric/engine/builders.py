"""The objects of a run built from its :class:`~deepmetric.config.Config`: data sets and
loaders, model, loss (with its cross-batch memory). Option keys were checked against the
functions they feed when the config was loaded (``deepmetric.config.validate_config``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from deepmetric.config import Config, ConfigError
from deepmetric.data import (
    ImageDataset,
    build_transform,
    class_disjoint_split,
    class_fold_split,
    describe_split,
    subset_classes,
    write_split_csv,
)
from deepmetric.engine.preemption import ignore_stop_signals
from deepmetric.engine.reproducibility import SeededBatches, SeededDataset, seed_worker
from deepmetric.engine.runlog import say
from deepmetric.engine.splits import (
    ImageSizeError,
    build_split,
    check_files,
    checked_split,
    data_name,
)
from deepmetric.losses import PROXY_LOSSES, build_loss
from deepmetric.memory import CrossBatchMemory
from deepmetric.models import build_model, preset_for
from deepmetric.samplers import PKSampler, RandomBatchSampler

__all__ = [
    "EvalSet",
    "build_batches",
    "build_criterion",
    "build_data",
    "build_eval_loader",
    "build_model_from_config",
    "build_train_loader",
    "build_transforms",
    "collate_images",
    "write_generated_split",
]


@dataclass
class EvalSet:
    """A retrieval evaluation: ``dataset`` embedded once; with ``query``/``gallery`` masks
    (N,) bool (In-Shop style) queries are searched in the gallery, else every item against
    the rest."""

    name: str  # "val" or "test"
    dataset: Dataset
    query: Tensor | None = None
    gallery: Tensor | None = None


def _eval_set(name: str, dataset: Any) -> EvalSet:
    q, g = getattr(dataset, "is_query", None), getattr(dataset, "is_gallery", None)
    if q is not None and g is not None and not bool((q & g).all()):
        return EvalSet(name, dataset, q.bool(), g.bool())
    return EvalSet(name, dataset)


def build_transforms(cfg: Config) -> tuple[Callable, Callable]:
    """(train transform, test transform) of ``data.transform`` (default: the backbone's
    preset) with ``data.transform_options``."""
    preset = cfg.data.transform or preset_for(cfg.model.backbone)
    options = cfg.data.transform_options
    try:
        return build_transform(preset, True, **options), build_transform(preset, False, **options)
    except ValueError as e:  # an option value the preset rejects (keys were checked)
        raise ConfigError(f"data.transform_options ({preset}): {e}") from None


def build_data(cfg: Config, *, test_only: bool = False) -> tuple[Any, dict[str, EvalSet]]:
    """(training set, evaluation sets) for ``eval.protocol``.

    ``test``: the training split, and the test split as ``"test"``.
    ``val``: the training split's classes divided by
    ``class_disjoint_split(labels, eval.val_fraction, seed)`` (with ``eval.val_folds``:
    ``class_fold_split(labels, val_folds, val_fold)``) into training classes and ``"val"``
    classes (test transform), or, with ``data.val_options``, the training split built with
    those options as ``"val"``. ``test_only``: ``(None, {"test": ...})``.
    """
    data = cfg.data
    train_tf, test_tf = build_transforms(cfg)
    if test_only:  # one split: nothing to compare, no hashing
        test = checked_split(cfg, "test", data.test_split, test_tf, data.test_options, digest=False)
        check_files(cfg, [test])
        return None, {"test": _eval_set("test", test.dataset)}
    train = checked_split(cfg, "train", data.train_split, train_tf, data.train_options)
    train_set = train.dataset
    if cfg.eval.protocol == "test":
        test = checked_split(cfg, "test", data.test_split, test_tf, data.test_options)
        check_files(cfg, [train, test])
        return train_set, {"test": _eval_set("test", test.dataset)}
    if data.val_options is not None:
        options = {**data.train_options, **data.val_options}
        val = checked_split(cfg, "val", data.train_split, test_tf, options)
        _check_val_classes(val.dataset.num_classes, "data.val_options")
        check_files(cfg, [train, val])
        return train_set, {"val": _eval_set("val", val.dataset)}
    check_files(cfg, [train])  # the validation classes are carved from these files
    if train_set.num_classes < 2:
        raise _too_few_classes(cfg, train_set.num_classes, "the training split")
    if cfg.eval.val_folds:
        how = f"eval.val_folds={cfg.eval.val_folds}"
        try:
            train_classes, val_classes = class_fold_split(
                train_set.labels, cfg.eval.val_folds, cfg.eval.val_fold
            )
        except ValueError as e:
            raise ConfigError(f"eval.val_folds: {e}") from None
    else:
        how = f"eval.val_fraction={cfg.eval.val_fraction}"
        train_classes, val_classes = class_disjoint_split(
            train_set.labels, cfg.eval.val_fraction, cfg.seed
        )
    _check_val_classes(len(val_classes), f"{how} of {train_set.num_classes} training classes")
    val = subset_classes(train_set, val_classes, transform=test_tf)
    return subset_classes(train_set, train_classes), {"val": _eval_set("val", val)}


def _check_val_classes(num_classes: int, how: str) -> None:
    """A validation split of one class scores every model perfectly (every neighbour is of
    the query's class): refuse it."""
    if num_classes < 2:
        raise ConfigError(
            f"eval.protocol=val: the validation split ({how}) has {num_classes} class; "
            "retrieval needs at least 2 or every neighbour counts as a hit: raise "
            "eval.val_fraction (or give data.val_options more classes)"
        )


def write_generated_split(cfg: Config, path: Path) -> str | None:
    """For data without a split of its own: the line describing the run's split, after
    writing its train and test parts to ``path`` (image files: an OML-style CSV, see
    ``deepmetric.data.write_split_csv``); None for data with a split."""
    data = cfg.data
    train = build_split(cfg, data.train_split, None, data.train_options, "none")
    rule = getattr(train, "generated_split", None)
    if rule is None:
        return None
    test = build_split(cfg, data.test_split, None, data.test_options, "none")
    line = (
        f"split: {describe_split(rule)}: training {len(train):,} images of "
        f"{train.num_classes:,} classes, test {len(test):,} images of {test.num_classes:,} "
        "classes"
    )
    if not isinstance(train, ImageDataset):
        return line
    write_split_csv(path, train, test)
    reset = " --data.test_classes=null" if data.test_classes is not None else ""
    reset += " --data.split_by=classes" if data.split_by != "classes" else ""
    return f"{line} -> {path} (reuse: --data.name=csv --data.root={path}{reset})"


def build_model_from_config(cfg: Config, *, pretrained: bool = True) -> nn.Module:
    """``deepmetric.models.build_model`` with the ``model`` section (``pretrained=False``:
    random init, e.g. before loading a checkpoint)."""
    m = cfg.model
    try:
        return build_model(
            m.backbone,
            embedding_dim=m.embedding_dim,
            pooling=m.pooling,
            pretrained=m.pretrained if pretrained else None,
            freeze_bn=m.freeze_bn,
            norm_layer=m.norm_layer or None,
            l2_normalize=m.l2_normalize,
            **m.options,
        )
    except ValueError as e:
        raise ConfigError(f"model ({m.backbone}): {e}") from None


def build_criterion(cfg: Config, num_classes: int | None = None) -> nn.Module:
    """The loss ``loss.name`` with its hyper-parameters, wrapped in a
    :class:`~deepmetric.memory.CrossBatchMemory` when ``xbm.enabled``.

    A proxy loss gets ``num_classes`` (the training split's number of classes: required),
    ``embedding_dim`` (``model.embedding_dim``) and ``seed`` (the run's) unless ``loss.*``
    sets them; a ``loss.num_classes`` other than the training split's is a ConfigError.
    """
    params = dict(cfg.loss.params)
    if cfg.loss.name in PROXY_LOSSES:
        if num_classes is None:
            raise ValueError(f"build_criterion: proxy loss {cfg.loss.name!r} needs num_classes")
        given = params.setdefault("num_classes", num_classes)
        if given != num_classes:
            raise ConfigError(
                f"loss.num_classes: {given}, but the training split has {num_classes} classes "
                f"(labels 0..{num_classes - 1}): leave --loss.num_classes unset, the trainer "
                "takes it from the training split"
            )
        params.setdefault("embedding_dim", cfg.model.embedding_dim)
        params.setdefault("seed", cfg.seed)
    loss = build_loss(cfg.loss.name, **params)
    if not cfg.xbm.enabled:
        return loss
    x = cfg.xbm
    return CrossBatchMemory(
        loss,
        x.size,
        cfg.model.embedding_dim,
        start_iteration=x.start_iteration,
        weight=x.weight,
        batch_loss=x.batch_loss,
    )


def _too_few_classes(cfg: Config, num_classes: int, what: str) -> ConfigError:
    return ConfigError(
        f"{what} of {data_name(cfg)} has {num_classes} class"
        f"{'' if num_classes == 1 else 'es'}; metric learning needs at least 2 (images of "
        "another class are the negatives): use a data set with more classes"
    )


def _fit_p(cfg: Config, usable: int, what: str) -> None:
    """``sampler.p`` above the ``usable`` classes of the training split: lowered to them,
    saying so, when the preset (or the default) set it, so that a preset fits a folder of a
    few classes; a ConfigError when the command line set it (or fewer than 2 are usable)."""
    s = cfg.sampler
    having = f" with at least k={s.k} images" if s.small_classes == "skip" else ""
    if usable >= 2 and not cfg.sources.get("sampler.p", "").startswith("command line"):
        say(f"sampler.p {s.p} -> {usable}: {what} has {usable} classes{having}")
        s.p = usable
        return
    change = "--sampler.p or --sampler.k" if s.small_classes == "skip" else "--sampler.p"
    raise ConfigError(
        f"--sampler.p={s.p} but {what} of {data_name(cfg)} has {usable} classes{having}; "
        f"lower {change} (at most --sampler.p={usable})"
    )


def build_batches(cfg: Config, train_set: Any, rank: int, world_size: int) -> SeededBatches:
    """This rank's batches of ``train_set``: P x K, or random with ``sampler.name: random``
    (per-sample augmentation seeds from ``seed``). A ``sampler.p`` above the training
    split's usable classes is lowered to them unless set on the command line (:func:`_fit_p`).
    ConfigError when the training split has fewer than 2 classes, fewer than P usable ones
    and P was set on the command line, or not one batch can be drawn."""
    s = cfg.sampler
    what = "the training split"
    if cfg.eval.protocol == "val" and cfg.data.val_options is None:
        what += " (what eval.protocol=val left for training)"
    counts = np.unique(np.asarray(train_set.labels), return_counts=True)[1]
    if len(counts) < 2:
        raise _too_few_classes(cfg, len(counts), what)
    if s.name == "random":
        random_batches = RandomBatchSampler(
            len(train_set), s.batch_size, seed=cfg.seed, num_replicas=world_size, rank=rank
        )
        if len(random_batches) == 0:
            raise ConfigError(
                f"--sampler.batch_size={s.batch_size}: not one batch per rank x {world_size} "
                f"rank(s) can be drawn from {len(train_set)} training images; lower it"
            )
        return SeededBatches(random_batches, cfg.seed)
    usable = int((counts >= s.k).sum()) if s.small_classes == "skip" else len(counts)
    if s.p > usable:
        _fit_p(cfg, usable, what)
    sampler = PKSampler(
        train_set.labels,
        s.p,
        s.k,
        seed=cfg.seed,
        small_classes=s.small_classes,
        num_replicas=world_size,
        rank=rank,
    )
    if len(sampler) == 0:
        ranks = f" for each of {world_size} ranks" if world_size > 1 else ""
        raise ConfigError(
            f"--sampler.p={s.p} --sampler.k={s.k}: not one batch can be drawn{ranks} from "
            f"{what} of {data_name(cfg)} ({len(counts)} classes, {len(train_set)} images); "
            "lower --sampler.p"
        )
    return SeededBatches(sampler, cfg.seed)


def collate_images(batch: list[tuple[Tensor, Any]]) -> Any:
    """``default_collate`` of (image (C, H, W), label) items, after checking that the images
    have one size (else :class:`ImageSizeError` saying which option to set)."""
    sizes = {tuple(item[0].shape) for item in batch}
    if len(sizes) > 1:
        a, b = sorted(sizes, reverse=True)[:2]
        shape = " x ".join
        raise ImageSizeError(
            f"images of different sizes in one batch ({shape(map(str, a))} and "
            f"{shape(map(str, b))}) and no option resizes them: set "
            f"--data.transform_options.size (e.g. --data.transform_options.size={max(a[1:])}) "
            "to resize every image to that square"
        )
    return default_collate(batch)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seeds (:func:`seed_worker`), and the stop signals left
    to the main process (:func:`~deepmetric.engine.preemption.ignore_stop_signals`)."""
    seed_worker(worker_id)
    ignore_stop_signals()


def build_train_loader(
    cfg: Config, dataset: Dataset, batches: SeededBatches, device: torch.device
) -> DataLoader:
    """Training batches of ``batches`` (seeded augmentation per sample)."""
    workers = cfg.data.num_workers
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=batches,
        collate_fn=collate_images,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_eval_loader(cfg: Config, dataset: Dataset, persistent: bool = True) -> DataLoader:
    """Batches of ``eval.batch_size`` in data-set order (test transform)."""
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        collate_fn=collate_images,
        num_workers=workers,
        persistent_workers=persistent and workers > 0,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(0),
    )
