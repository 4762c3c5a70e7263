"""The training loop: one function, :func:`train`, readable top to bottom.

Set-up (seeds, run folder, data, model, loss, optimizer, resume), then the step::

    images, labels = next(batches)                       # P x K batch
    set_lr(optimizer, lr_factor(iteration))              # schedule, every iteration
    with autocast:  emb = model(images)                  # (B, d), L2-normalised
    emb, labels = gather(emb.float(), labels)            # global batch (identity: 1 process)
    loss = criterion(emb, labels)                        # loss, or CrossBatchMemory(loss)
    backward, clip, step                                 # (GradScaler for fp16 on CUDA)

then logging, evaluation every ``eval.every`` iterations, checkpoints every
``train.checkpoint_every``.

Exact resume: a checkpoint holds the model, optimizer, loss and memory state, the loss's
random generators, the sampler position (epoch, batches consumed), the RNG states (torch,
CUDA, numpy, python) and the iteration; the schedule is a function of the iteration. Data
augmentation draws from a seed per sample derived from (seed, epoch, batch, position), so a
resumed run sees the same augmented images whatever the number of DataLoader workers.

Distributed training touches three functions only: :func:`wrap_model`, :func:`gather`,
:func:`is_main` (deepmetric.distributed; identities in a single process).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from deepmetric import distributed as dist
from deepmetric.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config
from deepmetric.engine.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    run_dir_of,
    save_checkpoint,
)
from deepmetric.engine.optim import build_optimizer, lr_factor, set_lr
from deepmetric.engine.runlog import RunLog

__all__ = [
    "EvalSet",
    "SeededBatches",
    "SeededDataset",
    "build_data",
    "build_model_from_config",
    "evaluate_model",
    "gather",
    "is_main",
    "seed_everything",
    "train",
    "wrap_model",
]


# ------------------------------------------------------------------ distributed hooks
# The only three places where multi-process training differs from a single process.


def wrap_model(model: nn.Module) -> nn.Module:
    """(a) Wrap the model for data-parallel training (DDP under torchrun; else the model)."""
    return dist.wrap_model(model)


def gather(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(b) The global batch the loss sees: (B_global, d) with gradient, (B_global,) labels."""
    return dist.gather_batch(emb, labels)


def is_main() -> bool:
    """(c) Whether this process writes files and prints (rank 0)."""
    return dist.is_main_process()


# ------------------------------------------------------------------ seeding and data


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG that third-party code uses
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _generator_states(module: nn.Module) -> dict[str, Tensor]:
    """States of the ``torch.Generator`` attributes of ``module`` and its children (e.g. the
    margin loss's sampling generator), keyed ``"child.path:attribute"``."""
    out = {}
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                out[f"{path}:{attr}"] = value.get_state()
    return out


def _set_generator_states(
    module: nn.Module, states: dict[str, Tensor], device: torch.device
) -> None:
    modules = dict(module.named_modules())
    for key, state in states.items():
        path, attr = key.rsplit(":", 1)
        sub = modules[path]
        gen = getattr(sub, attr, None)
        if not isinstance(gen, torch.Generator):  # created lazily on first use: create it now
            gen = torch.Generator(device=device)
            setattr(sub, attr, gen)
        gen.set_state(state)


class SeededBatches:
    """Batch sampler wrapping a :class:`~deepmetric.samplers.PKSampler`: yields
    ``[(index, seed), ...]`` where ``seed`` comes from (run seed, epoch, batch, position).

    With :class:`SeededDataset`, random augmentations depend on those seeds only: identical
    for any number of workers and after a resume in the middle of an epoch.
    """

    def __init__(self, sampler: Any, seed: int) -> None:
        self.sampler, self.seed = sampler, int(seed)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch ``epoch``'s batches from ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch)
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for b, batch in enumerate(self.sampler, start=self.start):
            seeds = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(
                len(batch), dtype=np.uint64)
            yield [(int(i), int(s)) for i, s in zip(batch, seeds)]


class SeededDataset(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` with torch's CPU generator seeded by
    ``seed`` (the caller's generator state is restored afterwards). The DataLoader fetches a
    whole batch through ``__getitems__``: one save/restore per batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[Any]:
        state = torch.get_rng_state()
        try:
            out = []
            for index, seed in items:
                torch.default_generator.manual_seed(seed)
                out.append(self.dataset[index])
            return out
        finally:
            torch.set_rng_state(state)


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker init: numpy and python RNGs from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


@dataclass
class EvalSet:
    """A retrieval evaluation: ``dataset`` embedded once; with ``query``/``gallery`` masks
    (In-Shop style) queries are searched in the gallery, else every item against the rest."""

    name: str  # "val" or "test"
    dataset: Dataset
    query: Tensor | None = None
    gallery: Tensor | None = None


def _make_eval_set(name: str, ds: Any) -> EvalSet:
    q, g = getattr(ds, "is_query", None), getattr(ds, "is_gallery", None)
    if q is not None and g is not None and not bool((q & g).all()):
        return EvalSet(name, ds, q.bool(), g.bool())
    return EvalSet(name, ds)


def _build_dataset(cfg: Config, split: str, transform: Any, extra: dict[str, Any]) -> Any:
    from deepmetric.data import DatasetError, build_dataset

    options = {**cfg.data.options, **extra}
    try:
        return build_dataset(cfg.data.name, cfg.data.root, split, transform, **options)
    except TypeError as e:  # unknown option
        raise ConfigError(f"data ({cfg.data.name}, split {split!r}): {e}; check data.options, "
                          "data.train_options, data.test_options") from None
    except DatasetError:
        raise
    except ValueError as e:  # unknown data set name, split, option value
        raise ConfigError(f"data ({cfg.data.name}, split {split!r}): {e}") from None


def _transforms(cfg: Config) -> tuple[Any, Any]:
    from deepmetric.data import build_transform
    from deepmetric.models import preset_for

    preset = cfg.data.transform or preset_for(cfg.model.backbone)
    try:
        return (build_transform(preset, True, **cfg.data.transform_options),
                build_transform(preset, False, **cfg.data.transform_options))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.transform / data.transform_options: {e}") from None


def build_data(cfg: Config, *, test_only: bool = False) -> tuple[Any, dict[str, EvalSet]]:
    """(training set, evaluation sets) for the configured protocol.

    ``eval.protocol: test``: the training split, and the test split as ``"test"``.
    ``eval.protocol: val``: the training split's classes divided by
    ``class_disjoint_split(labels, eval.val_fraction, seed)`` into training classes and
    ``"val"`` classes (test transform), or, with ``data.val_options``, the training split
    built with those options as ``"val"``. ``test_only`` builds just ``{"test": ...}``
    (training set None).
    """
    from deepmetric.data import class_disjoint_split, subset_classes

    train_tf, test_tf = _transforms(cfg)
    if test_only:
        test = _build_dataset(cfg, cfg.data.test_split, test_tf, cfg.data.test_options)
        return None, {"test": _make_eval_set("test", test)}
    train_ds = _build_dataset(cfg, cfg.data.train_split, train_tf, cfg.data.train_options)
    if cfg.eval.protocol == "test":
        test = _build_dataset(cfg, cfg.data.test_split, test_tf, cfg.data.test_options)
        return train_ds, {"test": _make_eval_set("test", test)}
    if cfg.data.val_options is not None:
        val = _build_dataset(cfg, cfg.data.train_split, test_tf,
                             {**cfg.data.train_options, **cfg.data.val_options})
        return train_ds, {"val": _make_eval_set("val", val)}
    train_classes, val_classes = class_disjoint_split(train_ds.labels, cfg.eval.val_fraction,
                                                      cfg.seed)
    val = subset_classes(train_ds, val_classes, transform=test_tf)
    return subset_classes(train_ds, train_classes), {"val": _make_eval_set("val", val)}


def build_model_from_config(cfg: Config, *, pretrained: bool = True) -> nn.Module:
    """``deepmetric.models.build_model`` with the ``model`` section (``pretrained=False``:
    random init, e.g. before loading a checkpoint)."""
    from deepmetric.models import build_model

    m = cfg.model
    try:
        return build_model(m.backbone, embedding_dim=m.embedding_dim, pooling=m.pooling,
                           pretrained=m.pretrained if pretrained else None,
                           freeze_bn=m.freeze_bn, norm_layer=m.norm_layer or None,
                           l2_normalize=m.l2_normalize, **m.options)
    except TypeError as e:
        raise ConfigError(f"model.options: {e}") from None
    except ValueError as e:
        raise ConfigError(f"model ({m.backbone}): {e}") from None


def _recall_at(cfg: Config) -> tuple[int, ...]:
    if cfg.eval.recall_at:
        return tuple(cfg.eval.recall_at)
    from deepmetric.evaluation import RECALL_AT

    return tuple(RECALL_AT.get(cfg.data.name, (1, 2, 4, 8)))


def _eval_loader(cfg: Config, ds: Dataset, persistent: bool = True) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=persistent and workers > 0,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(0))


def evaluate_model(
    model: nn.Module,
    eval_set: EvalSet,
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Embed ``eval_set`` (eval mode) and compute the retrieval metrics; the model's
    train/eval mode is restored. Returns e.g. {"recall@1": .., "map@r": .., "eval_time_s": ..}."""
    from deepmetric.evaluation import evaluate, extract_embeddings

    start = time.perf_counter()
    was_training = model.training
    emb, labels = extract_embeddings(model, loader, device=device, amp_dtype=amp_dtype,
                                     flip=cfg.eval.flip, progress=progress)
    model.train(was_training)
    kwargs = {"recall_at": _recall_at(cfg), "metrics": tuple(cfg.eval.metrics)}
    if eval_set.query is not None:
        q, g = eval_set.query, eval_set.gallery
        metrics = evaluate(emb[q], labels[q], emb[g], labels[g], **kwargs)
    else:
        metrics = evaluate(emb, labels, **kwargs)
    out = {k: (v if isinstance(v, int) else float(v)) for k, v in metrics.items()
           if isinstance(v, (int, float, np.floating))}
    out["eval_time_s"] = round(time.perf_counter() - start, 3)
    return out


# ------------------------------------------------------------------ run folder and resume


def _run_dir(cfg: Config, config_name: str | None) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    if cfg.train.resume not in (None, "auto"):
        return run_dir_of(find_checkpoint(cfg.train.resume, ("last",)))
    stem = Path(config_name).stem if config_name else "run"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    resume = cfg.train.resume
    has_last = (run_dir / "last").exists()
    if resume is None:
        if has_last:
            raise ConfigError(
                f"{run_dir} already holds a run (last -> {os.readlink(run_dir / 'last')}); "
                "continue it with --train.resume=auto, or choose another --output.dir"
            )
        return None
    if resume == "auto":
        return find_checkpoint(run_dir, ("last",)) if has_last else None
    return find_checkpoint(resume, ("last",))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and prefix.count(".") < 1:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_changes(old_text: str, cfg: Config) -> list[str]:
    """``"section.key: old -> new"`` for every setting that differs from the checkpoint's
    config (train.resume and output.dir excepted)."""
    import yaml

    try:
        old = config_from_dict(yaml.safe_load(old_text) or {}, "checkpoint config.yaml")
    except ConfigError:
        return ["(the checkpoint's config.yaml does not match this version's keys)"]
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(cfg))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k) and k not in ("train.resume", "output.dir")]


def _say(msg: str) -> None:
    if is_main():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)


def _fmt(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.startswith("recall@")] + [
        k for k in ("map@r", "r_precision", "nmi") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


# ------------------------------------------------------------------ training


def train(cfg: Config, *, config_name: str | None = None) -> dict[str, Any]:
    """Train as configured; returns a summary (run_dir, iteration, metrics at start and end,
    best checkpoint). Writes the run folder (rank 0 only): config.yaml, metrics.jsonl,
    loss.png / recall.png, checkpoints, summary.json."""
    from tqdm import tqdm

    from deepmetric.losses import build_loss
    from deepmetric.memory import CrossBatchMemory
    from deepmetric.samplers import PKSampler

    # ---- process, device, seeds
    rank, world_size, local_rank = dist.init_distributed()
    if cfg.train.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.train.device)
        except RuntimeError as e:
            raise ConfigError(f"train.device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {cfg.train.device!r} but CUDA is not available "
                              "(use auto or cpu)")
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ConfigError(f"train.amp: fp16 needs a CUDA device (running on {device.type}); "
                          "use bf16 or none")
    seed_everything(cfg.seed)

    # ---- run folder
    run_dir = _run_dir(cfg, config_name)
    resume_from = _resume_path(cfg, run_dir)
    main = is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir if main else None, cfg.output.tensorboard, cfg.output.plots)
    config_text = dump_config(cfg)

    # ---- data
    train_ds, eval_sets = build_data(cfg)
    sampler = PKSampler(train_ds.labels, cfg.sampler.p, cfg.sampler.k, seed=cfg.seed,
                        small_classes=cfg.sampler.small_classes,
                        num_replicas=world_size, rank=rank)
    batches = SeededBatches(sampler, cfg.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(SeededDataset(train_ds), batch_sampler=batches, num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=_seed_worker,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    eval_loaders = {name: _eval_loader(cfg, es.dataset) for name, es in eval_sets.items()}

    # ---- model, loss (+ memory), optimizer
    model = build_model_from_config(cfg).to(device)
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params)
    if cfg.xbm.enabled:
        criterion: nn.Module = CrossBatchMemory(
            loss_fn, cfg.xbm.size, cfg.model.embedding_dim, start_iteration=cfg.xbm.start_iteration,
            weight=cfg.xbm.weight, batch_loss=cfg.xbm.batch_loss)
    else:
        criterion = loss_fn
    criterion.to(device)
    optimizer = build_optimizer(cfg.optim, model, criterion)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    head_group = next((g for g in optimizer.param_groups if g["name"] == "head"),
                      optimizer.param_groups[0])

    # ---- resume
    iteration, epoch, batch_in_epoch = 0, 0, 0
    protocol = cfg.eval.protocol
    best_link = "best" if protocol == "val" else "best_test_selected"
    best: dict[str, Any] = {}
    start_metrics: dict[str, float] = {}
    if resume_from is not None:
        weights, state, old_config = load_checkpoint(resume_from, ("last",))
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        criterion.load_state_dict(state["criterion"])
        _set_generator_states(criterion, state["generators"], device)
        scaler.load_state_dict(state["scaler"])
        iteration, epoch, batch_in_epoch = state["iteration"], state["epoch"], state["batch"]
        best, start_metrics = state["best"], state["start_metrics"]
        _set_rng_state(state["rng"])
        log.truncate(iteration)
        changes = _config_changes(old_config, cfg)
        log.log({"iteration": iteration, "event": "resume", "checkpoint": str(resume_from),
                 "config_changes": changes})
        _say(f"resumed from {resume_from} at iteration {iteration} (epoch {epoch}, "
             f"batch {batch_in_epoch})")
        for line in changes:
            _say(f"  config changed on resume: {line}")
    if main:
        (run_dir / "config.yaml").write_text(config_text)
    ddp_model = wrap_model(model)
    total = cfg.train.iterations
    batch_size = cfg.sampler.p * cfg.sampler.k * world_size
    _say(f"run folder: {run_dir}")
    _say(f"training {len(train_ds):,} images of {train_ds.num_classes:,} classes, "
         + ", ".join(f"{n} {len(es.dataset):,} images" for n, es in eval_sets.items())
         + f"; batch {batch_size} = {cfg.sampler.p} x {cfg.sampler.k}"
         + (f" x {world_size} ranks" if world_size > 1 else "") + f"; device {device}")
    if protocol == "test":
        _say("eval.protocol=test: metrics are on the test split; a 'best_test_selected' "
             "checkpoint is selected on TEST (the papers' protocol, optimistic). Use "
             "eval.protocol=val for a class-disjoint validation split.")

    def run_eval() -> dict[str, dict[str, float]]:
        results = {}
        if main:
            for name, es in eval_sets.items():
                metrics = evaluate_model(model, es, eval_loaders[name], cfg, device, amp_dtype)
                log.log({"iteration": iteration, "split": name, **metrics})
                _say(f"[{iteration:>6}] {name}: {_fmt(metrics)} ({metrics['eval_time_s']:.1f} s)")
                results[name] = metrics
            log.plot()
        dist.barrier()
        return results

    def checkpoint(links: tuple[str, ...]) -> None:
        if not main:
            return
        state = {
            "iteration": iteration, "epoch": epoch, "batch": batch_in_epoch,
            "optimizer": optimizer.state_dict(), "criterion": criterion.state_dict(),
            "generators": _generator_states(criterion), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "best": best, "start_metrics": start_metrics,
        }
        save_checkpoint(run_dir, iteration, model.state_dict(), state, config_text, links)

    if iteration == 0 and cfg.eval.at_start and not start_metrics:
        results = run_eval()
        start_metrics = next(iter(results.values()), {})

    # ---- the loop
    batches.set_epoch(epoch, batch_in_epoch)
    if len(batches) == 0:
        raise ConfigError(f"sampler: no batch of {cfg.sampler.p} classes x {cfg.sampler.k} can "
                          f"be drawn from {train_ds.num_classes} training classes; lower "
                          "sampler.p")
    data_iter = iter(loader)
    model.train()
    bar = tqdm(total=total, initial=iteration, desc="train", dynamic_ncols=True,
               disable=not (main and cfg.train.progress), file=sys.stderr)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    window_start, window_images, t0 = time.perf_counter(), 0, time.perf_counter()
    last_metrics: dict[str, dict[str, float]] = {}
    while iteration < total:
        try:
            images, labels = next(data_iter)
        except StopIteration:
            epoch, batch_in_epoch = epoch + 1, 0
            batches.set_epoch(epoch)
            data_iter = iter(loader)
            continue
        batch_in_epoch += 1
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        # -------- one optimisation step
        set_lr(optimizer, lr_factor(iteration, cfg.schedule, total))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            emb = ddp_model(images)
        emb, all_labels = gather(emb.float(), labels)
        loss = criterion(emb, all_labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        iteration += 1
        # --------

        loss_sum += loss.detach()
        loss_count += 1
        window_images += images.shape[0] * world_size
        bar.update(1)
        if iteration % max(1, cfg.train.log_every) == 0 or iteration == total:
            elapsed = time.perf_counter() - window_start
            record = {
                "iteration": iteration, "epoch": epoch, "loss": float(loss_sum) / loss_count,
                "num_active": int(getattr(criterion, "num_active", -1)),
                "lr": head_group["lr"],
                "images_per_s": round(window_images / max(elapsed, 1e-9), 1),
                "time_s": round(time.perf_counter() - t0, 2),
            }
            log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            loss_sum.zero_()
            loss_count, window_images, window_start = 0, 0, time.perf_counter()
        links: list[str] = []
        evaluated = (cfg.eval.every and iteration % cfg.eval.every == 0) or iteration == total
        if evaluated:
            last_metrics = run_eval()
            name = "val" if protocol == "val" else "test"
            value = last_metrics.get(name, {}).get(cfg.eval.select_metric)
            if main and value is not None and value > best.get("value", -float("inf")):
                best = {"metric": cfg.eval.select_metric, "value": value,
                        "iteration": iteration, "split": name}
                links.append(best_link)
        if (cfg.train.checkpoint_every and iteration % cfg.train.checkpoint_every == 0) \
                or iteration == total:
            links.append("last")
        if links:
            checkpoint(tuple(links))
        if links or evaluated:
            window_start = time.perf_counter()  # evaluation/saving time is not training speed
    bar.close()

    # ---- the end: final numbers (and, after selection on validation, the test score)
    if not last_metrics and main and cfg.train.iterations == iteration and resume_from:
        last_metrics = run_eval()  # resumed at the end: report again
    test_of_best: dict[str, float] = {}
    if main and protocol == "val" and best and cfg.eval.final_test:
        ckpt = find_checkpoint(run_dir, ("best",))
        model.load_state_dict(load_checkpoint(ckpt, state=False)[0])
        _, test_sets = build_data(cfg, test_only=True)
        es = test_sets["test"]
        test_of_best = evaluate_model(model, es, _eval_loader(cfg, es.dataset, False), cfg,
                                      device, amp_dtype)
        log.log({"iteration": best["iteration"], "split": "test", "checkpoint": "best",
                 **test_of_best})
        _say(f"test split, best-on-val checkpoint (iteration {best['iteration']}): "
             f"{_fmt(test_of_best)}")
    final = next(iter(last_metrics.values()), {})
    summary = {
        "run_dir": str(run_dir), "iteration": iteration, "protocol": protocol,
        "start": start_metrics, "final": final, "best": best,
        "best_checkpoint": str(run_dir / best_link) if best else None,
        "test_of_best": test_of_best,
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary, cfg)
    log.close()
    return summary


def _print_summary(summary: dict[str, Any], cfg: Config) -> None:
    start, final = summary["start"], summary["final"]
    split = "validation" if summary["protocol"] == "val" else "test"
    keys = [k for k in final if k.startswith("recall@") or k == "map@r"]
    if keys:
        width = max(len(k) for k in keys)
        lines = [f"{split} split ({cfg.data.name}), iteration {summary['iteration']}:"]
        header = f"  {'metric':<{width}}  " + ("untrained  " if start else "") + "trained"
        lines.append(header)
        for k in keys:
            before = f"{start[k]:>9.4f}  " if k in start else ("          " if start else "")
            lines.append(f"  {k:<{width}}  {before}{final[k]:>7.4f}")
        _say("\n".join(lines))
    if summary["best"]:
        b = summary["best"]
        label = "selected on validation" if b["split"] == "val" else "selected on TEST"
        _say(f"best checkpoint ({label}): {b['metric']} {b['value']:.4f} at iteration "
             f"{b['iteration']} -> {summary['best_checkpoint']}")
    _say(f"run written to {summary['run_dir']}")
