"""Typed run configuration: nested dataclasses, YAML presets, dotted command-line overrides.

A run is described by one :class:`Config` (sections ``data``, ``model``, ``loss``, ``xbm``,
``sampler``, ``optim``, ``schedule``, ``train``, ``eval``, ``output`` and ``seed``). It is
read from YAML with :func:`load_config`, then overridden from the command line::

    --optim.lr=1e-4   --data.root PATH   --loss.margin=0.3   --data.transform_options.size=28

Every value (in the file or on the command line) is parsed with ``yaml.safe_load`` and
checked against the field's type; unknown keys and wrong types raise :class:`ConfigError`
naming the full dotted key, where it came from, and what was expected. The ``loss`` section
is ``name`` plus free-form hyper-parameters, handed to ``deepmetric.losses.build_loss`` and
checked against the loss's signature (``loss.<key>`` is named when one is not accepted).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# Deferred imports: deepmetric.data, .models, .losses and .evaluation, inside the checks that
# hold a config against their signatures and records; the config itself (dataclasses, YAML,
# overrides) loads without torch.

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "XBMConfig",
    "apply_overrides",
    "check_loss",
    "check_metrics",
    "check_options",
    "check_ranges",
    "check_rerank",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
    "recall_at",
    "validate_config",
    "where_set",
]


class ConfigError(Exception):
    """A user error in a configuration file or a command-line override (message names the key)."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the images come from and how they are turned into tensors."""

    name: str = "digits"  # deepmetric.data.build_dataset name
    root: str | None = None  # data set folder / file (None where the set needs none)
    options: dict[str, Any] = field(default_factory=dict)  # the loader's options, every split
    # Per-split options, merged over ``options`` (e.g. npz ``classes: [0, 764]`` for training
    # and ``classes: [764, 964]`` for testing).
    train_options: dict[str, Any] = field(default_factory=dict)
    test_options: dict[str, Any] = field(default_factory=dict)
    # eval.protocol val: None carves validation classes from the training split at random
    # (class_disjoint_split); a mapping builds the validation set explicitly from the training
    # split with these options instead (e.g. npz ``classes: [764, 964]``).
    val_options: dict[str, Any] | None = None
    train_split: str = "train"
    test_split: str = "test"
    # Data without a train/test split of its own (a flat folder of class folders, a CSV
    # without a split column, one list file): split_by "classes" holds out test_classes
    # classes (a fraction in (0, 1) or a count; null = half) for zero-shot testing;
    # split_by "images" (closed-set) holds out test_images of each class's images instead.
    # The split is printed and written to the run folder as split.csv (reusable with
    # --data.name=csv --data.root=RUN/split.csv). An error for data that has a split.
    test_classes: int | float | None = None
    split_by: Literal["classes", "images"] = "classes"
    test_images: float = 0.5
    split_seed: int = 0
    # Image files checked before the first step: "header" (headers parse, no truncated
    # JPEG/PNG), "decode" (every pixel), "none" (they exist); bad files raise naming them,
    # or are dropped with on_bad_image: skip
    validate: Literal["none", "header", "decode"] = "header"
    on_bad_image: Literal["raise", "skip"] = "raise"
    # Byte-identical image files in the training and the evaluation split stop a run (exit 2)
    # at data.validate header/decode; true: a warning instead (the benchmarks' official splits
    # always warn)
    allow_leakage: bool = False
    # What the data is and where to get it, said when data.root does not exist (presets of
    # data read by a generic loader, e.g. an .npz file)
    about: str | None = None
    transform: str | None = None  # bninception, imagenet, small; None: the backbone's preset
    # build_transform options; ``size`` = side of the square images the network sees, for
    # image files and array data alike (arrays are resized once, at load time)
    transform_options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 2


@dataclass
class ModelConfig:
    """deepmetric.models.build_model arguments."""

    backbone: str = "resnet50"
    embedding_dim: int = 512
    pooling: str = "avg"
    pretrained: str | None = None  # local weights file (nothing is downloaded)
    freeze_bn: bool = False
    norm_layer: str | bool | None = None  # None, "batchnorm" or "layernorm" after the linear
    l2_normalize: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # extra build_model keywords


@dataclass
class LossConfig:
    """``name`` plus the loss's own hyper-parameters.

    Flat in YAML (``loss: {name: contrastive, neg_margin: 0.5}``); ``params`` holds the rest.
    """

    name: str = "multi_similarity"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class XBMConfig:
    """Cross-batch memory (deepmetric.memory.CrossBatchMemory)."""

    enabled: bool = False
    size: int = 8192  # number of embeddings kept
    start_iteration: int = 0  # memory term switched on at this iteration
    weight: float = 1.0  # L = L_batch + weight * L_memory
    batch_loss: bool = True  # keep the in-batch term after the memory starts


@dataclass
class SamplerConfig:
    """Training batches on each rank. ``pk``: P classes, K images each (batch size P * K);
    ``random``: ``batch_size`` images drawn without replacement from a shuffled epoch, not
    class-balanced (the proxy losses' papers train this way)."""

    name: Literal["pk", "random"] = "pk"
    p: int = 16
    k: int = 4
    small_classes: Literal["replace", "skip"] = "replace"
    batch_size: int | None = None  # random: images per batch on each rank; pk: leave null

    def images_per_batch(self) -> int:
        """Images in one batch on one rank: p x k, or batch_size for random batches."""
        return self.p * self.k if self.name == "pk" else int(self.batch_size or 0)


@dataclass
class OptimConfig:
    """Optimizer with three parameter groups: backbone, head, loss parameters.

    ``lr`` / ``weight_decay`` apply to the embedding head and are the default for the backbone
    (``backbone_lr`` / ``backbone_weight_decay``) and for the loss's own parameters such as the
    margin loss's beta (``loss_lr``; ``loss_weight_decay`` defaults to 0). Real per-group
    learning rates: the schedule multiplies each group's own base value.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    backbone_lr: float | None = None
    backbone_weight_decay: float | None = None
    loss_lr: float | None = None
    loss_weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    eps: float = 1e-8  # adam/adamw
    grad_clip: float = 0.0  # max global L2 norm of the gradients; 0 = off


@dataclass
class ScheduleConfig:
    """Learning-rate factor as a function of the iteration (stepped every iteration).

    none: 1; step: gamma ** (it // step_size); multistep: gamma ** (number of milestones <= it);
    cosine: min_factor + (1 - min_factor) (1 + cos(pi t)) / 2 over the run after warm-up.
    A linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_iterations`` multiplies
    any of them.
    """

    name: Literal["none", "step", "multistep", "cosine"] = "none"
    step_size: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_factor: float = 0.0
    warmup_iterations: int = 0
    warmup_start_factor: float = 0.01


@dataclass
class TrainConfig:
    """The loop: iteration budget, precision, device, logging and checkpoint cadence."""

    iterations: int = 1000
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 only on CUDA (with a GradScaler)
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int | None = None  # torch.set_num_threads (None: leave PyTorch's default)
    log_every: int = 10  # iterations between metrics.jsonl records
    checkpoint_every: int = 500  # iterations between checkpoints (0 = at the end only)
    keep_last: int = 2  # checkpoints kept besides the best (the newest ones)
    resume: str | None = None  # None, "auto" (the run dir's newest good checkpoint) or a path
    progress: bool = True  # tqdm progress bar
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch
    # A step whose loss or gradients are NaN or inf: "stop" (exit 2, nothing saved after the
    # last good checkpoint) or "skip" (no update; stop after max_nonfinite_in_row in a row)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_in_row: int = 10
    # warm-up of the Proxy-Anchor code: the backbone gets no update for the first N
    # iterations (only the embedding head and the loss's parameters, e.g. proxies, train)
    freeze_backbone_iterations: int = 0
    # Gradient caching: each rank's batch is embedded in chunks of this many images without a
    # graph, the loss and its gradient are computed on the whole batch, then each chunk is
    # embedded again with its graph and given its part of that gradient. The parameters'
    # gradients equal one batch's (dropout replayed; BatchNorm sees chunk statistics unless
    # frozen), with one chunk's activations in memory. null: the whole batch at once.
    chunk_size: int | None = None


@dataclass
class EvalConfig:
    """Retrieval evaluation during training.

    ``protocol: test`` evaluates on the test split (the papers' protocol; any "best" checkpoint
    is then selected on test and labelled so). ``protocol: val`` carves a class-disjoint
    validation split (``val_fraction`` of the training classes, or ``data.val_options``),
    selects "best" on it and, with ``final_test``, reports that checkpoint on the test split.
    """

    protocol: Literal["test", "val"] = "test"
    val_fraction: float = 0.2
    # val_folds >= 2: validation = fold val_fold of val_folds contiguous blocks of the sorted
    # training classes (the Reality Check's cross-validation folds) instead of val_fraction
    val_folds: int = 0
    val_fold: int = 0
    every: int = 0  # iterations between evaluations (0 = at the end only)
    at_start: bool = False  # also evaluate the untrained network (iteration 0)
    recall_at: list[int] | None = None  # None: deepmetric.data.SOURCES[data.name].recall_at
    # names of deepmetric.evaluation.METRICS: recall, precision_at_1, map_at_r, r_precision, nmi
    metrics: list[str] = field(default_factory=lambda: ["recall", "map_at_r", "r_precision"])
    # the best checkpoint's metric: a result key ("recall@1", "map@r") or the name of a
    # metric with one key ("map_at_r"); it must be one the evaluation computes
    select_metric: str = "recall@1"
    batch_size: int = 256
    flip: bool = False  # average the embeddings of the image and its mirror
    final_test: bool = True  # protocol val: evaluate the best checkpoint on the test split
    # re-ranking of the retrieval lists before Recall@K / MAP@R: none, k_reciprocal or
    # alpha_qe, with its options (k1, k2, lambda_value, candidates; alpha, n, dba) in
    # rerank_options (deepmetric.evaluation.rerank)
    rerank: str = "none"
    rerank_options: dict[str, Any] = field(default_factory=dict)
    # open-set evaluation (0 = off): this share of the evaluation set's classes (drawn with
    # data.split_seed) leaves the gallery, so their queries have nothing to match; adds
    # open_set/precision and open_set/recall of the "match" answers (best score >= threshold)
    # and open_set/recall@K of the queries with a match (deepmetric.evaluation.open_set)
    open_set_fraction: float = 0.0
    # the threshold: "auto" = calibrated at FAR open_set_far over the pairs of the validation
    # classes (eval.protocol=val; never the test classes), or a score
    open_set_threshold: Literal["auto"] | float = "auto"
    open_set_far: float = 1e-3


@dataclass
class OutputConfig:
    """Run folder (config.yaml, run.json, metrics.jsonl, plots, checkpoints, report.html)."""

    dir: str | None = None  # None: runs/<config file stem>-<YYYYmmdd-HHMMSS>
    tensorboard: bool = False  # only if the tensorboard package is installed
    plots: bool = True  # loss.png and recall.png, rewritten at each evaluation
    # report.html at the end of `deepmetric train`: metrics, curves, per-class results, query
    # grids, embedding map (deepmetric.report.report_run; the evaluation split is embedded
    # once more for it; train() in Python leaves it to the caller)
    report: bool = True


@dataclass
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    xbm: XBMConfig = field(default_factory=XBMConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    # Where each key was set (dotted key -> "FILE" or "command line"); not part of the YAML.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # What loading did on the user's behalf, for the command line to print; not in the YAML.
    notes: list[str] = field(default_factory=list, repr=False, compare=False)


_NOT_KEYS = {"sources", "notes"}


# --------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise _Mismatch (nested keys: _KeyMismatch)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e3 written in YAML
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a folder called 2024
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) if args else v for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS]


def _unknown_key(key: str, valid: list[str], source: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean '{parent}{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _set_field(obj: Any, name: str, value: Any, key: str, source: str) -> None:
    tp = _hints(type(obj))[name]
    try:
        setattr(obj, name, _coerce(value, tp))
    except _Mismatch:
        raise ConfigError(
            f"{source}: {key}: expected {_type_name(tp)}, got {_show(value)}"
        ) from None


def _fill(obj: Any, raw: Any, prefix: str, source: str, sources: dict[str, str]) -> None:
    """Set the fields of dataclass ``obj`` from mapping ``raw`` (recursing into sections)."""
    if not isinstance(raw, dict):
        where = prefix or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {_show(raw)}")
    if isinstance(obj, LossConfig):
        for k, v in raw.items():
            key = f"{prefix}.{k}"
            if k == "name":
                _set_field(obj, "name", v, key, source)
            elif k == "params" and isinstance(v, dict):  # also accept an explicit params mapping
                obj.params.update(v)
                for kk in v:
                    sources[f"{key}.{kk}"] = source
            else:
                obj.params[str(k)] = v
            sources[key] = source
        return
    valid = _fields(type(obj))
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in valid:
            raise _unknown_key(key, valid, source)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            _fill(current, v if v is not None else {}, key, source, sources)
        else:
            _set_field(obj, k, v, key, source)
            sources[key] = source


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """A :class:`Config` from a nested mapping (as read from YAML); missing keys keep defaults."""
    cfg = Config()
    _fill(cfg, raw or {}, "", source, cfg.sources)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain mapping of ``cfg`` (the loss section flat: name plus hyper-parameters)."""
    out: dict[str, Any] = {}
    for name in _fields(Config):
        value = getattr(cfg, name)
        if isinstance(value, LossConfig):
            out[name] = {"name": value.name, **value.params}
        elif dataclasses.is_dataclass(value):
            out[name] = dataclasses.asdict(value)
        else:
            out[name] = value
    return out


def dump_config(cfg: Config) -> str:
    """The resolved configuration as YAML text (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- overrides


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--optim.lr=1e-4", "--data.root", "P"]`` -> ``[("optim.lr", 1e-4), ("data.root", "P")]``.

    Values are parsed with ``yaml.safe_load`` (``null``, ``true``, ``[1, 2]`` work); a value
    that does not parse as YAML is kept as the raw string.
    """
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"command line: unexpected argument {arg!r}; overrides look like "
                "--section.key=value or --section.key value"
            )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"command line: --{key} needs a value (--{key}=VALUE)")
            text = args[i + 1]
            i += 2
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise ConfigError(f"command line: malformed key {key!r} in {arg!r}")
        out.append((key, _parse_value(text)))
    return out


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(
    cfg: Config, overrides: list[tuple[str, Any]], source: str = "command line"
) -> Config:
    """Set dotted keys on ``cfg`` in place (types checked; dict fields take sub-keys)."""
    for key, value in overrides:
        loss_name = cfg.loss.name
        _apply_override(cfg, key, value, source)
        if cfg.loss.name != loss_name:
            _start_from_loss_defaults(cfg, loss_name, source)
    return cfg


def _start_from_loss_defaults(cfg: Config, old_name: str, source: str) -> None:
    """A ``loss.name`` changed on the command line: drop the hyper-parameters set elsewhere
    (those of the previous loss, from the config file), keep those given on the command
    line, and note which were dropped."""
    dropped = [
        k for k in cfg.loss.params if not cfg.sources.get(f"loss.{k}", "").startswith(source)
    ]
    for k in dropped:
        del cfg.loss.params[k]
        cfg.sources.pop(f"loss.{k}", None)
    if dropped:
        cfg.notes.append(
            f"loss.name {old_name!r} -> {cfg.loss.name!r}: starting from the defaults of "
            f"{cfg.loss.name!r}; dropped {', '.join('loss.' + k for k in dropped)} "
            f"(set for {old_name!r})"
        )


def _apply_override(cfg: Config, key: str, value: Any, source: str) -> None:
    """Set one dotted key (see :func:`apply_overrides`)."""
    where = f"{source} (--{key})"
    parts = key.split(".")
    obj: Any = cfg
    for depth, part in enumerate(parts):
        sub_key = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(obj, LossConfig) and part != "name":
            rest = ".".join(parts[depth:])
            if part == "params" and not last:
                rest = ".".join(parts[depth + 1 :])
            obj.params[rest] = value
            cfg.sources[f"loss.{rest}"] = source
            break
        valid = _fields(type(obj))
        if part not in valid:
            raise _unknown_key(sub_key, valid, where)
        current = getattr(obj, part)
        if last:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: {sub_key} is a section; set {sub_key}.KEY")
                _fill(current, value, sub_key, where, cfg.sources)
            else:
                _set_field(obj, part, value, sub_key, where)
                cfg.sources[sub_key] = source
            break
        if dataclasses.is_dataclass(current):
            obj = current
        elif isinstance(current, dict):
            d = current
            for p in parts[depth + 1 : -1]:
                d = d.setdefault(p, {})
                if not isinstance(d, dict):
                    raise ConfigError(f"{where}: {key}: {p} is not a mapping")
            d[parts[-1]] = value
            cfg.sources[key] = source
            break
        else:
            raise ConfigError(
                f"{where}: {sub_key} is {_type_name(_hints(type(obj))[part])}, "
                f"it has no sub-key {parts[depth + 1]!r}"
            )


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | list[tuple[str, Any]] | None = None,
    *,
    validate: bool = True,
) -> Config:
    """Read ``path`` (YAML), apply command-line ``overrides`` and check the result.

    Raises ConfigError for a missing file, invalid YAML, unknown keys, wrong types, and
    invalid combinations (see :func:`validate_config`), each naming the key and its source.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    cfg = config_from_dict(raw, source)
    if overrides:
        pairs = overrides if isinstance(overrides[0], tuple) else parse_overrides(overrides)  # type: ignore[arg-type]
        apply_overrides(cfg, pairs)  # type: ignore[arg-type]
    if validate:
        validate_config(cfg)
    return cfg


def where_set(cfg: Config, key: str) -> str:
    """Where ``key`` (or the mapping holding it, e.g. ``data.options``) was set."""
    while key not in cfg.sources and "." in key:
        key = key.rsplit(".", 1)[0]
    return cfg.sources.get(key, "defaults")


def _named(cfg: Config, key: str) -> str:
    """Where ``key`` was set, with the flag when on the command line:
    ``command line (--model.embedding_dim)``, else ``configs/x.yaml`` or ``defaults``."""
    where = where_set(cfg, key)
    return f"{where} (--{key})" if where == "command line" else where


@dataclass(frozen=True)
class _Range:
    """The numbers a key accepts: ``low`` up to ``high`` (None: unbounded), each bound
    included unless open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low or (x == self.low and not self.low_open)
        below = self.high is None or x < self.high or (x == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        low = f"{self.low:g}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {self.high:g}{right}"


_COUNT, _AT_LEAST_0, _ABOVE_0 = _Range(1), _Range(0), _Range(0, low_open=True)
_UNIT_OPEN_TOP = _Range(0, 1, high_open=True)

# Numeric keys with a domain not checked elsewhere in validate_config (null, where a key
# takes it, is always accepted; a list's every element must be in the domain).
_RANGES: dict[str, _Range] = {
    "seed": _AT_LEAST_0,
    "data.split_seed": _AT_LEAST_0,
    "model.embedding_dim": _COUNT,
    "xbm.size": _COUNT,
    "xbm.start_iteration": _AT_LEAST_0,
    "xbm.weight": _AT_LEAST_0,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.backbone_lr": _AT_LEAST_0,
    "optim.backbone_weight_decay": _AT_LEAST_0,
    "optim.loss_lr": _AT_LEAST_0,
    "optim.loss_weight_decay": _AT_LEAST_0,
    "optim.momentum": _UNIT_OPEN_TOP,
    "optim.betas": _UNIT_OPEN_TOP,
    "optim.eps": _ABOVE_0,
    "optim.grad_clip": _AT_LEAST_0,
    "schedule.step_size": _AT_LEAST_0,
    "schedule.milestones": _AT_LEAST_0,
    "schedule.gamma": _ABOVE_0,
    "schedule.min_factor": _Range(0, 1),
    "schedule.warmup_iterations": _AT_LEAST_0,
    "schedule.warmup_start_factor": _Range(0, 1, low_open=True),
    "train.threads": _COUNT,
    "eval.batch_size": _COUNT,
    "eval.open_set_fraction": _UNIT_OPEN_TOP,
}


def check_ranges(cfg: Config) -> None:
    """Every key of the table ``_RANGES`` within its domain, else a ConfigError naming the
    key, where it was set, the domain and the value."""
    for key, domain in _RANGES.items():
        *path, name = key.split(".")
        section: Any = cfg
        for part in path:
            section = getattr(section, part)
        value = getattr(section, name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if all(v in domain for v in values):
            continue
        each = " each" if isinstance(value, list) else ""
        nullable = type(None) in get_args(_hints(type(section))[name])
        null = " (or null)" if nullable else ""
        raise ConfigError(f"{_named(cfg, key)}: {key}: expected{each} {domain}{null}, got {value}")


def validate_config(cfg: Config) -> None:
    """Checks that need several fields or another module (the loss's hyper-parameters)."""

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where_set(cfg, key)}: {key}: {msg}")

    check_ranges(cfg)

    sampler = cfg.sampler
    if sampler.name == "pk":
        if sampler.k < 2:
            raise err("sampler.k", f"expected at least 2 images per class, got {sampler.k}")
        if sampler.p < 1:
            raise err("sampler.p", f"expected at least 1 class per batch, got {sampler.p}")
        if sampler.batch_size is not None and sampler.batch_size != sampler.p * sampler.k:
            raise err(
                "sampler.batch_size",
                f"P x K batches hold p x k = {sampler.p * sampler.k} images, got "
                f"{sampler.batch_size}: leave it null, or set --sampler.name=random",
            )
    elif sampler.batch_size is None or sampler.batch_size < 1:
        raise err(
            "sampler.batch_size",
            f"--sampler.name=random needs --sampler.batch_size=N (images per batch on each "
            f"rank, N >= 1), got {sampler.batch_size}",
        )
    if cfg.train.freeze_backbone_iterations < 0:
        raise err("train.freeze_backbone_iterations", "expected >= 0")
    chunk, batch = cfg.train.chunk_size, sampler.images_per_batch()
    if chunk is not None and (chunk < 1 or chunk > batch or batch % chunk):
        raise err(
            "train.chunk_size",
            f"{chunk} must divide the batch of {batch} images per rank "
            f"({'sampler.p x sampler.k' if sampler.name == 'pk' else 'sampler.batch_size'}) "
            "and be at most that: choose a divisor, or null for the whole batch at once",
        )
    if cfg.train.iterations < 0:
        raise err("train.iterations", f"expected >= 0, got {cfg.train.iterations}")
    for key in ("train.keep_last", "train.max_nonfinite_in_row"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise err(key, f"expected >= 1, got {getattr(getattr(cfg, section), name)}")
    for key in ("train.log_every", "train.checkpoint_every", "eval.every"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise err(key, "expected >= 0")
    if cfg.data.num_workers < 0:
        raise err("data.num_workers", "expected >= 0")
    if cfg.optim.lr < 0:
        raise err("optim.lr", "expected >= 0")
    if len(cfg.optim.betas) != 2:
        raise err("optim.betas", f"expected two numbers, got {cfg.optim.betas}")
    if cfg.xbm.enabled and cfg.xbm.size < sampler.images_per_batch():
        raise err(
            "xbm.size",
            f"must hold at least one batch ({sampler.images_per_batch()}), got {cfg.xbm.size}",
        )
    if cfg.eval.protocol == "val" and not 0.0 < cfg.eval.val_fraction < 1.0:
        raise err(
            "eval.val_fraction", f"expected a fraction in (0, 1), got {cfg.eval.val_fraction}"
        )
    folds = cfg.eval.val_folds
    if folds == 1 or folds < 0:
        raise err("eval.val_folds", f"expected 0 (off) or at least 2 folds, got {folds}")
    if folds and not 0 <= cfg.eval.val_fold < folds:
        raise err("eval.val_fold", f"expected a fold in 0..{folds - 1}, got {cfg.eval.val_fold}")
    if folds and cfg.data.val_options is not None:
        raise err(
            "eval.val_folds",
            "folds are carved from the training classes, but data.val_options names the "
            "validation data; set --data.val_options=null",
        )
    test_classes = cfg.data.test_classes
    if test_classes is not None:
        if cfg.data.split_by == "images":
            raise err(
                "data.test_classes",
                "applies to data.split_by=classes; with split_by=images set data.test_images",
            )
        if isinstance(test_classes, int) and test_classes < 1:
            raise err("data.test_classes", f"expected a count >= 1, got {test_classes}")
        if isinstance(test_classes, float) and not 0.0 < test_classes < 1.0:
            raise err(
                "data.test_classes",
                f"expected a fraction in (0, 1) or a count of classes, got {test_classes}",
            )
    if not 0.0 < cfg.data.test_images < 1.0:
        raise err("data.test_images", f"expected a fraction in (0, 1), got {cfg.data.test_images}")
    if cfg.schedule.name == "step" and cfg.schedule.step_size <= 0:
        raise err("schedule.step_size", "expected > 0 with schedule.name: step")
    if cfg.schedule.name == "multistep" and not cfg.schedule.milestones:
        raise err("schedule.milestones", "expected a non-empty list with schedule.name: multistep")
    if cfg.eval.recall_at is not None and any(k < 1 for k in cfg.eval.recall_at):
        raise err("eval.recall_at", f"expected positive integers, got {cfg.eval.recall_at}")
    if cfg.train.resume not in (None, "auto") and not Path(cfg.train.resume).exists():
        raise err(
            "train.resume",
            f"expected null, 'auto' or an existing checkpoint, "
            f"got {cfg.train.resume!r} (not found)",
        )
    check_options(cfg)
    check_metrics(cfg)
    check_rerank(cfg)
    check_loss(cfg)


def recall_at(cfg: Config) -> tuple[int, ...]:
    """The K of Recall@K: ``eval.recall_at``, else those of ``data.name``'s papers
    (``deepmetric.data.SOURCES[name].recall_at``)."""
    from deepmetric.data import find_source

    if cfg.eval.recall_at:
        return tuple(cfg.eval.recall_at)
    return find_source(cfg.data.name).recall_at


def check_metrics(cfg: Config) -> None:
    """Check ``eval.metrics`` (names of ``deepmetric.evaluation.METRICS``, a near match
    named) and resolve ``eval.select_metric`` to the result key it means (``map_at_r`` ->
    ``map@r``), which must be one the evaluation computes."""
    from deepmetric.evaluation import check_metric_names, result_key, result_keys

    try:
        if not check_metric_names(cfg.eval.metrics):
            raise ValueError("expected at least one metric, e.g. [recall, map_at_r]")
    except ValueError as e:
        raise ConfigError(f"{where_set(cfg, 'eval.metrics')}: eval.metrics: {e}") from None
    spelling, ks = cfg.eval.select_metric, recall_at(cfg)
    try:
        cfg.eval.select_metric = result_key(spelling, cfg.eval.metrics, ks)
    except ValueError as e:
        if where_set(cfg, "eval.select_metric") == "defaults":  # follow eval.metrics
            cfg.eval.select_metric = result_keys(cfg.eval.metrics, ks)[0]
            cfg.notes.append(
                f"eval.select_metric: the default {spelling} is not computed with eval.metrics "
                f"{cfg.eval.metrics}; the best checkpoint is selected by "
                f"{cfg.eval.select_metric}"
            )
            return
        raise ConfigError(
            f"{where_set(cfg, 'eval.select_metric')}: eval.select_metric={spelling}: {e} (as "
            "eval.metrics and eval.recall_at say)"
        ) from None


def check_rerank(cfg: Config) -> None:
    """Check ``eval.rerank`` (a name of ``deepmetric.evaluation.rerank.OPTIONS``) and each
    ``eval.rerank_options`` key against that re-ranking's options, naming the key."""
    from deepmetric.evaluation.rerank import RerankError
    from deepmetric.evaluation.rerank import check_rerank as check

    try:
        check(cfg.eval.rerank)
    except RerankError as e:
        raise ConfigError(f"{_named(cfg, 'eval.rerank')}: eval.rerank: {e}") from None
    for key, value in cfg.eval.rerank_options.items():
        try:
            check(cfg.eval.rerank, {key: value})
        except RerankError as e:  # the message starts with the key
            where = _named(cfg, f"eval.rerank_options.{key}")
            raise ConfigError(f"{where}: eval.rerank_options.{e}") from None


def check_options(cfg: Config) -> None:
    """Check the option mappings against the functions they feed: ``data.name``'s loader
    (``data.options`` and the per-split ones), the transform preset
    (``data.transform_options``) and ``build_model`` (``model.options``)."""
    from deepmetric.data import PRESET_OPTIONS, find_source, loader_options
    from deepmetric.models import build_model, preset_for

    def unknown(key: str, option: str, accepted: Sequence[str], what: str) -> ConfigError:
        close = difflib.get_close_matches(option, accepted, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(
            f"{where_set(cfg, f'{key}.{option}')}: {key}.{option}: not an option of {what}{hint}; "
            f"expected one of: {', '.join(accepted) or '(none)'}"
        )

    try:
        name = find_source(cfg.data.name).name
    except ValueError as e:
        raise ConfigError(f"{where_set(cfg, 'data.name')}: data.name: {e}") from None
    accepted = [o for o in loader_options(name) if o != "size"]
    data_keys = _fields(DataConfig)
    for key in ("data.options", "data.train_options", "data.test_options", "data.val_options"):
        for option in getattr(cfg.data, key.split(".")[1]) or {}:
            if option == "size":
                raise ConfigError(
                    f"{where_set(cfg, f'{key}.size')}: {key}.size: the image size is set by "
                    "data.transform_options.size for every data set (array data are resized "
                    "once at load time to it)"
                )
            if option in data_keys:
                raise ConfigError(
                    f"{where_set(cfg, f'{key}.{option}')}: {key}.{option}: set data.{option} "
                    f"instead (--data.{option}=...), the same for every data set"
                )
            if option not in accepted:
                raise unknown(key, option, accepted, f"data set {name!r}")
    try:
        preset = cfg.data.transform or preset_for(cfg.model.backbone)
    except ValueError as e:  # an empty or malformed name
        raise ConfigError(f"{where_set(cfg, 'model.backbone')}: model.backbone: {e}") from None
    if preset not in PRESET_OPTIONS:
        raise ConfigError(
            f"{where_set(cfg, 'data.transform')}: data.transform: unknown preset "
            f"{preset!r}; expected one of {', '.join(PRESET_OPTIONS)}"
        )
    for option in cfg.data.transform_options:
        if option not in PRESET_OPTIONS[preset]:
            raise unknown(
                "data.transform_options",
                option,
                PRESET_OPTIONS[preset],
                f"the {preset!r} transform",
            )
    model_keys = _fields(ModelConfig)
    extra = [p for p in inspect.signature(build_model).parameters if p not in model_keys]
    for option in cfg.model.options:
        if option in model_keys:
            raise ConfigError(
                f"{where_set(cfg, f'model.options.{option}')}: model.options."
                f"{option}: set model.{option} instead"
            )
        if option not in extra:
            raise unknown("model.options", option, extra, "build_model")


def check_loss(cfg: Config) -> None:
    """Check ``loss.name`` and every ``loss.<key>`` against the loss's constructor.

    Unknown names and hyper-parameters (``build_loss`` raises TypeError) become a
    ConfigError naming ``loss.<key>``; so do a value of another type than the constructor's
    annotation (``loss.alpha: abc``) and a value the loss rejects (ValueError). A proxy
    loss is built with ``model.embedding_dim`` (``loss.embedding_dim`` may only repeat it)
    and two classes unless ``loss.num_classes`` is set (the trainer passes the training
    split's count); it cannot sit in a cross-batch memory (``xbm.enabled``).
    """
    from deepmetric.losses import LOSSES, PROXY_LOSSES, build_loss

    name = cfg.loss.name
    if name not in LOSSES:
        raise ConfigError(
            f"{where_set(cfg, 'loss.name')}: loss.name: unknown loss {name!r}; "
            f"expected one of {', '.join(sorted(LOSSES))}"
        )
    accepted = list(inspect.signature(LOSSES[name]).parameters)
    hints = get_type_hints(LOSSES[name].__init__)
    for key, value in cfg.loss.params.items():
        if key not in accepted:
            raise ConfigError(
                f"{where_set(cfg, 'loss.' + key)}: loss.{key}: not a hyper-parameter of loss "
                f"{name!r}; expected one of: {', '.join(accepted)}"
            )
        if key in hints:
            try:
                _coerce(value, hints[key])
            except _Mismatch:
                raise ConfigError(
                    f"{_named(cfg, 'loss.' + key)}: loss.{key} ({name}): expected "
                    f"{_type_name(hints[key])}, got {_show(value)}"
                ) from None
    params = dict(cfg.loss.params)
    if cfg.xbm.enabled and params.get("simix"):
        raise ConfigError(
            f"{where_set(cfg, 'loss.simix')}: loss.simix: similarity mixup adds virtual rows to "
            "the batch, which a cross-batch memory cannot rank against its stored rows: set "
            "--loss.simix=false or --xbm.enabled=false"
        )
    if name in PROXY_LOSSES:
        if cfg.xbm.enabled:
            raise ConfigError(
                f"{where_set(cfg, 'xbm.enabled')}: xbm.enabled: a cross-batch memory needs a "
                f"pair-based loss; {name!r} is a proxy loss (embeddings against class proxies, "
                "no pairs): set --xbm.enabled=false or choose a pair-based --loss.name"
            )
        dim = params.setdefault("embedding_dim", cfg.model.embedding_dim)
        if dim != cfg.model.embedding_dim:
            raise ConfigError(
                f"{where_set(cfg, 'loss.embedding_dim')}: loss.embedding_dim: {dim} differs from "
                f"model.embedding_dim {cfg.model.embedding_dim}; leave it unset (the proxies "
                "take --model.embedding_dim)"
            )
        params.setdefault("num_classes", 2)  # placeholder: the training split's count comes later
    try:
        build_loss(name, **params)
    except TypeError as e:
        m = re.search(r"argument '(\w+)'", str(e))
        key = f"loss.{m.group(1)}" if m else "loss"
        raise ConfigError(f"{where_set(cfg, key)}: {key}: {e}") from None
    except ValueError as e:  # "temperature must be > 0, got 0": where temperature was set
        m = re.match(r"(\w+) must", str(e))
        key = f"loss.{m.group(1)}" if m and m.group(1) in cfg.loss.params else "loss.name"
        raise ConfigError(f"{_named(cfg, key)}: loss ({name}): {e}") from None
