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
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepmetric.config import ConfigError, load_config, parse_overrides
from deepmetric.engine.divergence import TrainingDiverged
from deepmetric.engine.run_folder import newest_good_checkpoint, run_contents

from .space import Param, load_space, space_corners, suggest

__all__ = ["TuneSettings", "TuneStopped", "open_study", "tune"]


class TuneStopped(Exception):
    """A signal stopped the running trial after a checkpoint (``deepmetric tune`` exits 75)."""


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


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "deepmetric tune needs Optuna: pip install 'optuna>=4.5' (or the package's [tune] "
            "extra)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints a line per trial
    return optuna


def open_study(settings: TuneSettings, out: Path) -> Any:
    """Create or load the study (TPE + median pruning) in its storage."""
    optuna = _optuna()
    if settings.storage:
        storage = _database(settings.storage)
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        if settings.prune
        else optuna.pruners.NopPruner()
    )
    with warnings.catch_warnings():  # group= is "experimental" (since Optuna 2.8)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=settings.seed, multivariate=True, group=True, constant_liar=True
        )
    return optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def _database(url: str) -> Any:
    """Optuna's RDBStorage at ``url``, with heartbeats so that another worker retries the
    trial of a worker that died. Workers that start together on a new database race to
    create its tables: the loser tries again."""
    import optuna
    from sqlalchemy import exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=60,
                    grace_period=180,
                    heartbeat_stale_trial_callback=_retry,
                )
        except exc.IntegrityError:  # another worker created the same table meanwhile
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
        except (ImportError, ValueError, exc.SQLAlchemyError) as e:  # no driver, server, db
            msg = str(e).strip().splitlines()[0]
            raise ConfigError(f"--storage {url}: cannot open it: {msg}") from None
    raise AssertionError("unreachable")


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
    from .results import write_results

    optuna = _optuna()
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
    _claim_folder(out, settings)
    study = open_study(settings, out)
    _retry_abandoned(study)
    done = _finished(study)
    if done < trials:
        say_line(f"tune: {done} of {trials} trials finished in study {settings.study_name!r}")
        stop_at = optuna.study.MaxTrialsCallback(
            trials,
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
        )
        try:
            study.optimize(
                lambda trial: _objective(trial, settings, space, out),
                callbacks=[stop_at, lambda study, trial: _print_trial(study, trial, metric)],
                catch=(TrainingDiverged,),
                gc_after_trial=True,
            )
        except TuneStopped:
            _retry_abandoned(study)
            raise
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
    """Load the preset with every corner of the space: unknown keys and wrong types fail
    here, before any training, naming the key. Also check the metric is evaluated."""
    cfg = None
    for corner in space_corners(space):
        try:
            cfg = trial_config(settings, corner, Path("unused"), 0 if settings.folds else None)
        except ConfigError as e:
            raise ConfigError(f"{settings.space}: {e}") from None
    assert cfg is not None
    metrics = {"recall": "recall@1", "map_at_r": "map@r", "r_precision": "r_precision"}
    known = {metrics.get(m, m) for m in cfg.eval.metrics}
    if settings.metric not in known and not settings.metric.startswith("recall@"):
        raise ConfigError(
            f"--metric {settings.metric}: not computed by eval.metrics {cfg.eval.metrics}; "
            f"use one of {sorted(known)}"
        )


def _claim_folder(out: Path, settings: TuneSettings) -> None:
    """Write OUT/tune.json, or check that the tune already in OUT has the same settings."""
    path = out / "tune.json"
    mine = asdict(settings)
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
    resume_dir = trial.user_attrs.get("resume_dir")
    run_dir = Path(resume_dir) if resume_dir else out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    point = suggest(trial, space)
    try:
        if not settings.folds:
            return _train(trial, settings, point, run_dir, fold=None)
        scores = []
        for fold in range(settings.folds):
            scores.append(_train(trial, settings, point, run_dir / f"fold-{fold}", fold))
            trial.set_user_attr("fold_scores", scores)
            trial.report(scores[-1], fold)
            if settings.prune and trial.should_prune():
                raise _optuna().TrialPruned(f"fold {fold}: {scores[-1]:.4f}")
        return statistics.fmean(scores)
    except TrainingDiverged as e:
        trial.set_user_attr("failure", f"diverged: {e}")
        raise
    except (TuneStopped, KeyboardInterrupt):
        trial.set_user_attr("failure", "interrupted")
        raise
    except _optuna().TrialPruned:
        raise
    except Exception as e:
        trial.set_user_attr("failure", f"error: {type(e).__name__}: {e}")
        raise


def _train(
    trial: Any, settings: TuneSettings, point: list[tuple[str, Any]], run_dir: Path, fold: Any
) -> float:
    """One training run of the trial; returns its best validation value of the metric."""
    from deepmetric.engine import train

    optuna = _optuna()
    cfg = trial_config(settings, point, run_dir, fold)

    def report(iteration: int, metrics: dict[str, dict[str, float]]) -> None:
        value = metrics["val"][settings.metric]
        trial.report(value, iteration)
        if settings.prune and trial.should_prune():
            raise optuna.TrialPruned(f"iteration {iteration}: {value:.4f}")

    if run_contents(run_dir) and newest_good_checkpoint(run_dir)[0] is None:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to resume
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(run_dir / "train.log", "a", buffering=1) as log,
        contextlib.redirect_stdout(log),
    ):
        summary = train(
            cfg, config_name=settings.preset, on_evaluate=None if fold is not None else report
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


# --------------------------------------------------------------------------- retries


def _retry_abandoned(study: Any) -> None:
    """Fail the RUNNING trials whose worker process on this machine is gone, then queue once
    more every trial that was interrupted or killed (not one that diverged or raised), to
    resume in its run folder from the newest good checkpoint there."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(Exception):  # another worker got there first
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("failure", "interrupted") == "interrupted":
            _retry(study, t)


def _retry(study: Any, trial: Any) -> None:
    """Queue ``trial``'s point again (once), with its run folder to resume from."""
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    if trial.number in retried:
        return
    attrs: dict[str, Any] = {"retry_of": trial.number}
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        attrs["resume_dir"] = run_dir
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
