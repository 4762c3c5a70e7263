"""The training loop, :func:`train`, readable top to bottom: set-up, then one
:func:`train_step` per iteration, a periodic evaluate-and-checkpoint, and a stop with a
checkpoint when a signal asks for it (:mod:`deepmetric.engine.preemption`).

One step::

    set_lr(optimizer, lr_factor(iteration))                # schedule, every iteration
    with autocast:  emb = model(images)                    # (B, d), L2-normalised
    emb, labels = gather_batch(emb.float(), labels)        # global batch (1 process: as is)
    loss = criterion(emb, labels)                          # loss, or CrossBatchMemory(loss)
    backward, average_gradients(loss parameters)           # train.chunk_size: gradient caching
    loss and gradient norm finite? else NonFiniteStep      # one host sync (NaN guard)
    clip, step                                             # GradScaler for fp16 on CUDA

A step that is not finite stops the run or is skipped, and no NaN or inf reaches a
checkpoint (:mod:`deepmetric.engine.divergence`).
Exact resume: everything that changes is in :class:`~deepmetric.engine.state.TrainState`, and
augmentations draw from per-sample seeds (:mod:`deepmetric.engine.reproducibility`).
Under torchrun: DDP (``train.sync_bn`` for SyncBatchNorm), the loss on the gathered global
batch, loss-parameter gradients averaged over ranks, sharded evaluation
(:class:`~deepmetric.engine.evaluator.Evaluator`); rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deepmetric import distributed as dist
from deepmetric.config import Config, ConfigError, dump_config, validate_config
from deepmetric.engine.builders import (
    build_batches,
    build_criterion,
    build_data,
    build_model_from_config,
    build_train_loader,
    write_generated_split,
)
from deepmetric.engine.checkpoint import find_checkpoint, load_checkpoint
from deepmetric.engine.devices import amp_dtype, resolve_device
from deepmetric.engine.divergence import DivergenceGuard, NonFiniteStep, check_step
from deepmetric.engine.evaluator import Evaluator
from deepmetric.engine.gradient_cache import chunked_backward
from deepmetric.engine.optim import build_optimizer, lr_factor, set_lr
from deepmetric.engine.preemption import StopSignals
from deepmetric.engine.reproducibility import SeededBatches, seed_everything
from deepmetric.engine.run_folder import (
    check_writable,
    config_changes,
    removed_if_unused,
    resolve_run_dir,
    resume_checkpoint,
    set_aside_newer_checkpoints,
    write_run_file,
)
from deepmetric.engine.runlog import LossMeter, RunLog, format_metrics, say
from deepmetric.engine.state import CheckpointMismatch, TrainState
from deepmetric.evaluation import ordered_keys
from deepmetric.losses import EmbeddingError

__all__ = ["train", "train_step"]


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: Tensor,
    labels: Tensor,
    *,
    lr_scale: float,
    amp: torch.dtype | None,
    grad_clip: float,
    freeze_backbone: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """One optimisation step on this rank's batch (B_r, C, H, W), (B_r,); returns the
    detached loss of the global batch. ``chunk_size``: embed the batch that many images at a
    time with the same gradients (:mod:`~deepmetric.engine.gradient_cache`).
    ``freeze_backbone``: the backbone group's gradients are dropped before the step, so only
    the head and the loss's parameters change (as with requires_grad off, but DDP's
    bookkeeping stays as built). Raises :class:`NonFiniteStep`, having updated nothing, when
    the model's embeddings, the loss or a gradient hold NaN or inf."""
    set_lr(optimizer, lr_scale)
    optimizer.zero_grad(set_to_none=True)

    def loss_of(emb: Tensor) -> Tensor:
        """The loss of the global batch (this rank's embeddings gathered with the others')."""
        global_emb, global_labels = dist.gather_batch(emb, labels)
        try:
            return criterion(global_emb, global_labels)
        except EmbeddingError as e:  # NaN, inf or zero rows out of the model: it diverged
            raise NonFiniteStep(f"the model's {e.problem}") from None

    if chunk_size and chunk_size < images.shape[0]:
        loss = chunked_backward(model, images, chunk_size, loss_of, scaler.scale, amp)
    else:
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            emb = model(images)
        loss = loss_of(emb.float())
        scaler.scale(loss).backward()
    dist.average_gradients(criterion.parameters())  # outside DDP: keep the copies identical
    if freeze_backbone:  # train.freeze_backbone_iterations: no update, no moments, no decay
        for group in optimizer.param_groups:
            if group["name"] == "backbone":
                for p in group["params"]:
                    p.grad = None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    check_step(loss, params, gradients=not scaler.is_enabled())  # fp16: the scaler's job
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The embedding head's current learning rate (the first group's if it has none)."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g["name"] == "head"), groups[0]["lr"])


def _best_link(protocol: str) -> str:
    """The run folder's link to the best checkpoint: "best" when selected on validation,
    "best_test_selected" when selected on the test split (the papers' protocol)."""
    return "best" if protocol == "val" else "best_test_selected"


def _due(iteration: int, every: int, total: int) -> bool:
    """Every ``every`` iterations (0: never) and at the last one."""
    return (every > 0 and iteration % every == 0) or iteration == total


def train(
    cfg: Config,
    *,
    config_name: str | None = None,
    on_evaluate: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
) -> dict[str, Any]:
    """Train as configured; returns the summary (run folder, iteration, metrics at start
    and end, best checkpoint). Rank 0 writes the run folder: config.yaml, run.json,
    metrics.jsonl, loss.png / recall.png, checkpoints, summary.json; ``deepmetric train`` then
    writes report.html (:func:`deepmetric.report.report_run`), as the caller may.

    ``on_evaluate(iteration, {split: metrics})`` is called after each evaluation during
    training, once its checkpoint is written; an exception it raises ends the run there
    (``deepmetric tune`` prunes a trial this way).

    Stopped by SIGTERM, SIGINT or SIGUSR1, it writes a checkpoint after the current step and
    returns ``{"run_dir", "iteration", "stopped_by": signal name, "checkpoint"}``. Raises
    :class:`~deepmetric.engine.divergence.TrainingDiverged` when training produces NaN or inf
    (``train.on_nonfinite``).
    """
    # ---- process, device, seeds
    validate_config(cfg)  # also for a Config built in Python: option keys, loss parameters
    rank, world_size, _ = dist.init_distributed()
    device = resolve_device(cfg.train.device)
    amp = amp_dtype(cfg.train.amp, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    main = dist.is_main_process()
    run_dir = Path(dist.broadcast_object(str(resolve_run_dir(cfg, config_name))))  # rank 0's

    with removed_if_unused(run_dir):  # a set-up that fails leaves no empty run folder
        check_writable(cfg, run_dir)  # before any data is read
        # ---- data, model, loss (+ memory), optimizer, run folder
        resume_from = resume_checkpoint(cfg, run_dir)
        train_set, eval_sets = build_data(cfg)
        batches = build_batches(cfg, train_set, rank, world_size)
        loader = build_train_loader(cfg, train_set, batches, device)
        model = build_model_from_config(cfg).to(device)
        criterion = build_criterion(cfg, train_set.num_classes).to(device)
        optimizer = build_optimizer(cfg.optim, model, criterion)
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        state = TrainState(model, optimizer, criterion, scaler)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            split_line = write_generated_split(cfg, run_dir / "split.csv")  # data without one
            if split_line:
                say(split_line)
        log = RunLog(run_dir if main else None, cfg.output.tensorboard, cfg.output.plots)
        if resume_from is not None:
            _resume(state, resume_from, cfg, log, run_dir)
        config_text = dump_config(cfg)
        if main:
            (run_dir / "config.yaml").write_text(config_text)
            write_run_file(run_dir, cfg, config_name)  # preset and command line, for the report
        ddp_model = dist.wrap_model(model, sync_bn=cfg.train.sync_bn)
        state.model = model = dist.unwrap_model(ddp_model)  # with SyncBatchNorm if converted
        evaluator = Evaluator(cfg, eval_sets, device, amp)
        _say_start(cfg, run_dir, train_set, eval_sets, world_size, device)
        if state.iteration == 0 and cfg.eval.at_start and not state.start_metrics:
            state.start_metrics = next(iter(_evaluate(evaluator, model, 0, log).values()), {})

        # ---- the loop
        total, split = cfg.train.iterations, cfg.eval.protocol
        best_link = _best_link(split)
        stream = _batches_from(state, loader, batches)
        guard = DivergenceGuard(
            cfg.train.on_nonfinite, cfg.train.max_nonfinite_in_row, cfg.optim.lr, resume_from
        )
        model.train()
        meter = LossMeter(device)
        bar = tqdm(
            total=total,
            initial=state.iteration,
            desc="train",
            dynamic_ncols=True,
            disable=not (main and cfg.train.progress),
            file=sys.stderr,
        )
        last_metrics: dict[str, dict[str, float]] = {}
        # SIGTERM, SIGINT, SIGUSR1: stop after the step, saved; the bar ends its line before
        # any error is printed
        with StopSignals() as stop, bar:
            while state.iteration < total:
                images, labels = next(stream)
                guard.before_step(model)
                try:
                    loss = train_step(
                        ddp_model,
                        criterion,
                        optimizer,
                        scaler,
                        images.to(device, non_blocking=True),
                        labels.to(device, non_blocking=True),
                        lr_scale=lr_factor(state.iteration, cfg.schedule, total),
                        amp=amp,
                        grad_clip=cfg.optim.grad_clip,
                        freeze_backbone=state.iteration < cfg.train.freeze_backbone_iterations,
                        chunk_size=cfg.train.chunk_size,
                    )
                    meter.add(loss, images.shape[0] * world_size)
                    guard.step_applied()
                except NonFiniteStep as problem:  # "stop": raises TrainingDiverged
                    _drop_step(guard, state.iteration + 1, problem, model, log)
                state.iteration += 1
                bar.update(1)
                if _due(state.iteration, max(1, cfg.train.log_every), total):
                    _log_training(log, bar, state, meter.record())

                stop_signal = stop.requested()  # the same on every rank
                links: list[str] = []
                evaluated = _due(state.iteration, cfg.eval.every, total)
                if evaluated:
                    last_metrics = _evaluate(evaluator, model, state.iteration, log)
                    if state.update_best(last_metrics[split], cfg.eval.select_metric, split):
                        links.append(best_link)
                if links or stop_signal or _due(state.iteration, cfg.train.checkpoint_every, total):
                    guard.last_good = _save(
                        state, guard, run_dir, config_text, (*links, "last"), cfg
                    )
                if stop_signal:
                    bar.close()
                    return _stopped(stop_signal, state, guard.last_good, run_dir, log)
                if evaluated and on_evaluate is not None:
                    on_evaluate(state.iteration, last_metrics)
                if links or evaluated:
                    meter.restart_clock()  # evaluating and saving are not training speed
        return _finish(cfg, state, evaluator, log, run_dir, last_metrics)


def _drop_step(
    guard: DivergenceGuard, iteration: int, problem: NonFiniteStep, model: nn.Module, log: RunLog
) -> None:
    """A step that was not applied: stop (:class:`TrainingDiverged`) or log the skip."""
    guard.step_dropped(iteration, problem, model)
    log.log({"iteration": iteration, "event": "nonfinite_step_skipped", "problem": str(problem)})
    say(f"[{iteration:>6}] skipped a step: {problem}")


def _save(
    state: TrainState,
    guard: DivergenceGuard,
    run_dir: Path,
    config_text: str,
    links: tuple[str, ...],
    cfg: Config,
) -> Path:
    """Check the state for NaN and inf on every rank (:class:`TrainingDiverged`), then write
    the checkpoint on rank 0; returns its folder."""
    guard.check_state(state.nonfinite_tensor(), state.iteration)
    if dist.is_main_process():
        return state.save(run_dir, config_text, links, cfg.train.keep_last)
    return run_dir / "checkpoints" / f"iter-{state.iteration:07d}"


def _stopped(
    signal_name: str, state: TrainState, checkpoint: Path | None, run_dir: Path, log: RunLog
) -> dict[str, Any]:
    """The end of a run stopped by a signal, its checkpoint written: log, say where, return."""
    log.log({"iteration": state.iteration, "event": "stopped", "signal": signal_name})
    log.close()
    say(
        f"stopped by {signal_name} after iteration {state.iteration}: checkpoint {checkpoint}; "
        f"continue with --train.resume=auto --output.dir={run_dir}"
    )
    return {
        "run_dir": str(run_dir),
        "iteration": state.iteration,
        "stopped_by": signal_name,
        "checkpoint": str(checkpoint),
    }


def _batches_from(
    state: TrainState, loader: DataLoader, batches: SeededBatches
) -> Iterator[tuple[Tensor, Tensor]]:
    """Training batches, endlessly, from the sampler position (epoch, batch_in_epoch) of
    ``state``, which advances with every batch and epoch."""
    batches.set_epoch(state.epoch, state.batch_in_epoch)
    while True:
        for images, labels in loader:
            state.batch_in_epoch += 1
            yield images, labels
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        batches.set_epoch(state.epoch)


def _resume(state: TrainState, checkpoint: Path, cfg: Config, log: RunLog, run_dir: Path) -> None:
    """Restore ``state`` from ``checkpoint``; drop the log records and set aside the
    checkpoints after it; log and print the settings that changed since. A checkpoint past
    ``train.iterations`` is refused before anything in the run folder changes."""
    try:
        changes = config_changes(state.load(checkpoint), cfg)
    except CheckpointMismatch as e:
        changes = config_changes(e.config_text, cfg)
        raise ConfigError(f"{e}; settings changed since: {'; '.join(changes) or 'none'}") from None
    if state.iteration > cfg.train.iterations:
        raise ConfigError(
            f"--train.iterations={cfg.train.iterations} is below the iteration of the "
            f"checkpoint resumed from ({checkpoint}: iteration {state.iteration}): set "
            f"--train.iterations={state.iteration} to evaluate it as it is, or more to train on"
        )
    log.truncate(state.iteration)
    dist.barrier()  # every rank has read the checkpoints
    if dist.is_main_process():
        set_aside_newer_checkpoints(run_dir, state.iteration, state.best.get("iteration"))
    log.log(
        {
            "iteration": state.iteration,
            "event": "resume",
            "checkpoint": str(checkpoint),
            "config_changes": changes,
        }
    )
    say(
        f"resumed from {checkpoint} at iteration {state.iteration} (epoch {state.epoch}, "
        f"batch {state.batch_in_epoch})"
    )
    for line in changes:
        say(f"  config changed on resume: {line}")


def _log_training(log: RunLog, bar: Any, state: TrainState, window: dict[str, float]) -> None:
    """One metrics.jsonl training record (loss and speed over the window since the last)."""
    record = {
        "iteration": state.iteration,
        "epoch": state.epoch,
        **window,
        "num_active": int(getattr(state.criterion, "num_active", -1)),
        "lr": _head_lr(state.optimizer),
    }
    log.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")


def _evaluate(evaluator: Evaluator, model: nn.Module, iteration: int, log: RunLog) -> dict:
    """Evaluate every set, log and print the metrics, redraw the plots."""
    results = evaluator.evaluate(model)
    for name, metrics in results.items():
        log.log({"iteration": iteration, "split": name, **metrics})
        shown = name + _closed_set_note(evaluator.eval_sets[name].dataset)
        say(f"[{iteration:>6}] {shown}: {format_metrics(metrics)} ({metrics['eval_time_s']:.1f} s)")
    log.plot()
    return results


def _closed_set_note(dataset: Any) -> str:
    """ " (CLOSED-SET ...)" for a test set of the training classes (``data.split_by:
    images``), else ""."""
    rule = getattr(dataset, "generated_split", None) or {}
    return " (CLOSED-SET: classes seen in training)" if rule.get("by") == "images" else ""


def _say_start(
    cfg: Config,
    run_dir: Path,
    train_set: Any,
    eval_sets: dict,
    world_size: int,
    device: torch.device,
) -> None:
    say(f"run folder: {run_dir}")
    sets = ", ".join(
        f"{name} {len(es.dataset):,} images{_closed_set_note(es.dataset)}"
        for name, es in eval_sets.items()
    )
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    s = cfg.sampler
    per_rank = f"{s.p} x {s.k}" if s.name == "pk" else f"{s.batch_size} random images"
    say(
        f"training {len(train_set):,} images of {train_set.num_classes:,} classes, {sets}; "
        f"batch {s.images_per_batch() * world_size} = {per_rank}{ranks}; device {device}"
    )
    if cfg.eval.protocol == "test":
        say(
            "eval.protocol=test: metrics are on the test split; a 'best_test_selected' "
            "checkpoint is selected on TEST (the papers' protocol, optimistic). Use "
            "eval.protocol=val for a class-disjoint validation split."
        )


def _finish(
    cfg: Config,
    state: TrainState,
    evaluator: Evaluator,
    log: RunLog,
    run_dir: Path,
    last_metrics: dict,
) -> dict[str, Any]:
    """Final numbers (after selection on validation: the best checkpoint on the test split),
    summary.json and the printed summary."""
    if not last_metrics:  # resumed at the end, or no iteration asked for: never an empty final
        last_metrics = _evaluate(evaluator, state.model, state.iteration, log)
    test_of_best: dict[str, float] = {}
    if cfg.eval.protocol == "val" and state.best and cfg.eval.final_test:
        dist.barrier()  # rank 0 has written the best checkpoint
        best_dir = find_checkpoint(run_dir, ("best",))
        state.model.load_state_dict(load_checkpoint(best_dir, state=False)[0])
        _, test_sets = build_data(cfg, test_only=True)
        calibration = evaluator.eval_sets.get("val")  # an auto open-set threshold's classes
        tester = Evaluator(
            cfg, test_sets, evaluator.device, evaluator.amp_dtype, False, calibration
        )
        test_of_best = tester.evaluate(state.model)["test"]
        log.log(
            {
                "iteration": state.best["iteration"],
                "split": "test",
                "checkpoint": "best",
                **test_of_best,
            }
        )
        say(
            f"test split{_closed_set_note(test_sets['test'].dataset)}, best-on-val checkpoint "
            f"(iteration {state.best['iteration']}): "
            f"{format_metrics(test_of_best)}"
        )
    best_link = _best_link(cfg.eval.protocol)
    summary = {
        "run_dir": str(run_dir),
        "iteration": state.iteration,
        "protocol": cfg.eval.protocol,
        "start": state.start_metrics,
        "final": next(iter(last_metrics.values()), {}),
        "best": state.best,
        "best_checkpoint": str(run_dir / best_link) if state.best else None,
        "test_of_best": test_of_best,
    }
    if dist.is_main_process():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _say_summary(summary, cfg)
    log.close()
    return summary


def _say_summary(summary: dict[str, Any], cfg: Config) -> None:
    start, final = summary["start"], summary["final"]
    split = "validation" if summary["protocol"] == "val" else "test"
    if split == "test" and cfg.data.split_by == "images":
        split += " (CLOSED-SET: classes seen in training)"
    keys = ordered_keys(final)
    if keys:
        width = max(len(k) for k in keys)
        lines = [f"{split} split ({cfg.data.name}), iteration {summary['iteration']}:"]
        lines.append(f"  {'metric':<{width}}  " + ("untrained  " if start else "") + "trained")
        for k in keys:
            before = f"{start[k]:>9.4f}  " if k in start else ("          " if start else "")
            lines.append(f"  {k:<{width}}  {before}{final[k]:>7.4f}")
        say("\n".join(lines))
    if summary["best"]:
        b = summary["best"]
        label = "selected on validation" if b["split"] == "val" else "selected on TEST"
        say(
            f"best checkpoint ({label}): {b['metric']} {b['value']:.4f} at iteration "
            f"{b['iteration']} -> {summary['best_checkpoint']}"
        )
    say(f"run written to {summary['run_dir']}")
