"""``deepmetric tune``: hyper-parameter search with Optuna, every trial a normal, resumable
deepmetric run scored on class-disjoint validation data only.

One trial::

    overrides = suggest(trial, space)                          # the trial's point
    for each fold (or the one validation split):
        train(preset + overrides + eval.protocol=val,          # OUT/trials/NNNN[/fold-f]
              on_evaluate = report to Optuna, prune if below the median)
    value = mean over folds of the best validation METRIC      # maximised

The study lives in OUT/study.journal (Optuna's journal file: several processes on one machine
may share it) or in any database ``--storage`` names (several machines). A tune stopped by a
signal, or killed, loses only its running trial's steps since the last checkpoint: that trial
is queued again with its run folder and resumes from there; finished trials are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepmetric.config import ConfigError, load_config, parse_overrides, recall_at
from deepmetric.engine.divergence import TrainingDiverged
from deepmetric.engine.run_folder import newest_good_checkpoint, run_contents
from deepmetric.engine.trainer import train
from deepmetric.evaluation import result_key

from .results import write_results
from .space import Param, load_space, space_corners, suggest, walk
from .storage import boot_id, direction, open_study, optuna_module, redacted, retry_abandoned

# Deferred imports: optuna (optional, the [tune] extra), inside the functions that use it.

__all__ = ["TuneSettings", "TuneStopped", "trial_config", "tune"]


class TuneStopped(Exception):
    """A signal stopped the running trial after a checkpoint (``deepmetric tune`` exits 75)."""


class TrialFailed(Exception):
    """A trial raised (a config its point makes invalid, out of memory ...): it is recorded
    as failed and the tune goes on, unless :data:`FAILURES_IN_A_ROW` failed in a row."""


#: Consecutive failed trials of one worker after which the tune stops with an error.
FAILURES_IN_A_ROW = 3


@dataclass
class TuneSettings:
    """What a tune is (OUT/tune.json); a tune resumed in OUT must have the same."""

    preset: str
    preset_sha256: str
    space: str
    space_sha256: str
    overrides: list[str]
    metric: str = "map@r"
    folds: int = 0  # >= 2: class-disjoint cross-validation folds of the training classes
    seed: int = 0  # TPE's seed
    prune: bool = True
    study_name: str = ""
    storage: str = ""  # "" = OUT/study.journal
    # trial overrides deepmetric sets (validation only, no report, the trial's folder)
    fixed: list[list[Any]] = field(default_factory=list)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tune(
    preset: str,
    space_path: str,
    *,
    trials: int,
    out: str | Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    metric: str = "map@r",
    folds: int = 0,
    seed: int = 0,
    prune: bool = True,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` finished (complete or pruned) ones, then
    write the results (see :func:`deepmetric.tune.results.write_results`). Returns
    ``{"out", "best": {...} | None, "finished", "files"}``. Raises :class:`TuneStopped`
    when a signal stopped a trial (its checkpoint is kept and it resumes next time)."""
    optuna = optuna_module()
    overrides = list(overrides or [])
    out = Path(out) if out else Path("runs") / f"tune-{Path(preset).stem}"
    settings = _settings(preset, space_path, overrides, metric, folds, seed, prune, storage)
    settings.study_name = study_name or Path(preset).stem
    space = load_space(space_path)
    _check_space(settings, space)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "deepmetric tune runs each trial in one process; for several GPUs start one tune "
            "worker per GPU (CUDA_VISIBLE_DEVICES=i deepmetric tune ... with the same --out "
            "or --storage), not torchrun"
        )
    # a database study is opened first, so that a wrong URL leaves no tune.json behind
    study = open_study(settings, out) if settings.storage else None
    _claim_folder(out, settings)
    study = study or open_study(settings, out)
    retry_abandoned(study)
    done = _finished(study)
    if done < trials:
        say_line(f"tune: {done} of {trials} trials finished in study {settings.study_name!r}")
        stop_at = optuna.study.MaxTrialsCallback(
            trials,
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
        )
        failed: list[Any] = []  # this worker's failed trials since its last good one

        def after_trial(study: Any, trial: Any) -> None:
            _print_trial(study, trial, metric)
            error = trial.user_attrs.get("failure", "").startswith("error")  # not diverged
            failed[:] = [*failed, trial] if error else []
            if len(failed) >= FAILURES_IN_A_ROW:
                study.stop()

        try:
            study.optimize(
                lambda trial: _objective(trial, settings, space, out),
                callbacks=[stop_at, after_trial],
                catch=(TrainingDiverged, TrialFailed),
                gc_after_trial=True,
            )
        except TuneStopped:
            retry_abandoned(study)
            raise
        if len(failed) >= FAILURES_IN_A_ROW:
            last = failed[-1]
            raise ConfigError(
                f"tune stopped: {len(failed)} trials in a row failed; the last, trial "
                f"{last.number}: {last.user_attrs.get('failure', '?')} (traceback in "
                f"{last.user_attrs.get('run_dir', out)}/train.log)"
            )
    return write_results(study, settings, space, out)


def say_line(text: str) -> None:
    print(text, flush=True)


def _settings(
    preset: str,
    space_path: str,
    overrides: list[str],
    metric: str,
    folds: int,
    seed: int,
    prune: bool,
    storage: str | None,
) -> TuneSettings:
    for path, what in ((preset, "config"), (space_path, "search space")):
        if not Path(path).is_file():
            raise ConfigError(f"{what} file not found: {path}")
    if folds == 1 or folds < 0:
        raise ConfigError(f"--folds: expected 0 (one validation split) or >= 2, got {folds}")
    fixed: list[list[Any]] = [
        ["eval.protocol", "val"],
        ["eval.final_test", False],
        ["eval.select_metric", metric],
        ["output.report", False],
        ["train.progress", False],
    ]
    return TuneSettings(
        preset=preset,
        preset_sha256=_sha256(preset),
        space=space_path,
        space_sha256=_sha256(space_path),
        overrides=overrides,
        metric=metric,
        folds=folds,
        seed=seed,
        prune=prune,
        storage=storage or "",
        fixed=fixed,
    )


def trial_config(
    settings: TuneSettings, point: list[tuple[str, Any]], run_dir: Path, fold: int | None
) -> Any:
    """The Config of one run of a trial: preset, the user's overrides, the trial's point,
    then deepmetric's own (validation protocol, the run folder, resume)."""
    pairs = parse_overrides(settings.overrides) + point
    pairs += [(k, v) for k, v in settings.fixed]
    pairs += [("output.dir", str(run_dir)), ("train.resume", "auto")]
    if fold is not None:
        pairs += [("eval.val_folds", settings.folds), ("eval.val_fold", fold)]
    return load_config(settings.preset, pairs)


def _check_space(settings: TuneSettings, space: list[Param]) -> None:
    """Resolve ``--metric`` to the result key it means (the check of
    ``eval.select_metric``), then load the preset with every corner of the space: unknown
    keys and wrong types fail here, before any training, naming the key."""
    mine = {k for k, _ in settings.fixed} | {"output.dir", "train.resume"}
    mine |= {"eval.val_folds", "eval.val_fold"}
    reserved = sorted({p.key for p in walk(space)} & mine)
    if reserved:
        raise ConfigError(
            f"{settings.space}: {reserved[0]} is set by deepmetric tune in every trial (the "
            "trials are validated, logged and stored its way); leave it out of the search space"
        )
    preset = load_config(settings.preset, parse_overrides(settings.overrides), validate=False)
    try:
        ks = recall_at(preset)
    except ValueError:  # a wrong data.name: the corners below name it
        ks = ()
    if ks:
        try:
            settings.metric = result_key(settings.metric, preset.eval.metrics, ks)
        except ValueError as e:
            raise ConfigError(f"--metric {settings.metric}: {e} (as eval.metrics says)") from None
        settings.fixed = [
            [k, settings.metric if k == "eval.select_metric" else v] for k, v in settings.fixed
        ]
    for corner in space_corners(space):
        try:
            trial_config(settings, corner, Path("unused"), 0 if settings.folds else None)
        except ConfigError as e:
            raise ConfigError(f"{settings.space}: {e}") from None


def _claim_folder(out: Path, settings: TuneSettings) -> None:
    """Write OUT/tune.json, or check that the tune already in OUT has the same settings."""
    path = out / "tune.json"
    mine = asdict(settings)
    mine["storage"] = redacted(settings.storage)  # no password in the file
    if path.is_file():
        theirs = json.loads(path.read_text())
        differs = [k for k in mine if k not in ("preset", "space") and theirs.get(k) != mine.get(k)]
        if differs:
            raise ConfigError(
                f"{out} holds another tune ({', '.join(differs)} differ; see {path}); resume "
                "it with the same settings, or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "space.yaml").write_bytes(Path(settings.space).read_bytes())
    path.write_text(json.dumps(mine, indent=2) + "\n")


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# --------------------------------------------------------------------------- one trial


def _objective(trial: Any, settings: TuneSettings, space: list[Param], out: Path) -> float:
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("boot", boot_id())
    resume_dir = trial.user_attrs.get("resume_dir")
    run_dir = Path(resume_dir) if resume_dir else out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    point = suggest(trial, space)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as lock:
        try:  # two workers that both queued the retry of one trial: the second one stops
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            trial.set_user_attr("failure", f"duplicate: another worker is training {run_dir}")
            raise TrialFailed(f"trial {trial.number}: {run_dir} is in use") from None
        return _run_point(trial, settings, point, run_dir)


def _run_point(
    trial: Any, settings: TuneSettings, point: list[tuple[str, Any]], run_dir: Path
) -> float:
    """Train the trial's point (once, or once per fold); its score; a failure noted."""
    try:
        if not settings.folds:
            return _train(trial, settings, point, run_dir, fold=None)
        scores = []
        for fold in range(settings.folds):
            scores.append(_train(trial, settings, point, run_dir / f"fold-{fold}", fold))
            trial.set_user_attr("fold_scores", scores)
            trial.report(statistics.fmean(scores), fold)  # the score so far: folds' mean
            last = fold == settings.folds - 1  # a finished trial is scored, never pruned
            if settings.prune and not last and trial.should_prune():
                raise optuna_module().TrialPruned(f"fold {fold}: {scores[-1]:.4f}")
        return statistics.fmean(scores)
    except TrainingDiverged as e:
        trial.set_user_attr("failure", f"diverged: {e}")
        raise
    except (TuneStopped, KeyboardInterrupt):
        trial.set_user_attr("failure", "interrupted")
        raise
    except optuna_module().TrialPruned:
        raise
    except Exception as e:
        trial.set_user_attr("failure", f"error: {type(e).__name__}: {e}")
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log:
            log.write(traceback.format_exc())
        raise TrialFailed(f"trial {trial.number}: {type(e).__name__}: {e}") from e


def train_logged(cfg: Any, run_dir: Path, config_name: str, on_evaluate: Any = None) -> dict:
    """``deepmetric.engine.train`` in ``run_dir`` (cfg's output.dir, train.resume=auto), its
    output appended to run_dir/train.log; a folder stopped before its first checkpoint starts
    over. Returns the run's summary."""
    if run_contents(run_dir) and newest_good_checkpoint(run_dir)[0] is None:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to resume
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(run_dir / "train.log", "a", buffering=1) as log,
        contextlib.redirect_stdout(log),
    ):
        return train(cfg, config_name=config_name, on_evaluate=on_evaluate)


def _train(
    trial: Any, settings: TuneSettings, point: list[tuple[str, Any]], run_dir: Path, fold: Any
) -> float:
    """One training run of the trial; returns its best validation value of the metric."""
    optuna = optuna_module()
    cfg = trial_config(settings, point, run_dir, fold)

    better = max if direction(settings.metric) == "maximize" else min
    best_so_far = math.nan

    def report(iteration: int, metrics: dict[str, dict[str, float]]) -> None:
        """Report the trial's score so far (its best value: the score is the best over the
        run); prune below the median, except at the last iteration (the run is done)."""
        nonlocal best_so_far
        value = metrics["val"][settings.metric]
        best_so_far = value if math.isnan(best_so_far) else better(best_so_far, value)
        trial.report(best_so_far, iteration)
        last = iteration >= cfg.train.iterations
        if settings.prune and not last and trial.should_prune():
            raise optuna.TrialPruned(f"iteration {iteration}: {best_so_far:.4f}")

    summary = train_logged(
        cfg, run_dir, settings.preset, on_evaluate=None if fold is not None else report
    )
    if summary.get("stopped_by"):
        raise TuneStopped(
            f"{summary['stopped_by']} during trial {trial.number} (checkpoint "
            f"{summary.get('checkpoint')})"
        )
    best = summary.get("best") or {}
    if "value" not in best:
        raise ConfigError(f"{run_dir}: the run reported no validation {settings.metric}")
    return float(best["value"])


def _print_trial(study: Any, trial: Any, metric: str) -> None:
    shown = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    value = "" if trial.value is None else f" {metric} {trial.value:.4f}"
    state = trial.state.name.lower()
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f" at step {step}: {trial.intermediate_values[step]:.4f}"
    failure = trial.user_attrs.get("failure", "")
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    try:
        best = f" | best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = ""
    say_line(
        f"trial {trial.number}: {state}{value}{best} | {shown} | {seconds:.0f} s"
        + (f" | {failure}" if failure else "")
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
