"""Where a tune's study lives, and how abandoned trials come back.

The study is stored in OUT/study.journal (Optuna's journal file storage, which processes on
one machine may share) or in the database a ``--storage`` URL names (Optuna's RDBStorage, with
heartbeats, for several machines). A trial whose worker stopped on a signal, or died (its
process gone on this machine, or its heartbeat silent), is queued again once with the same
point and its run folder, so that the new attempt resumes from the folder's checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from deepmetric.config import ConfigError
from deepmetric.evaluation import metric_of_key

# Deferred imports: optuna and sqlalchemy (optional, the [tune] extra), inside the functions
# that use them.

__all__ = ["direction", "open_study", "optuna_module", "redacted", "retry_abandoned"]


def optuna_module() -> Any:
    """The ``optuna`` module, quiet below errors (tune prints its own line per trial)."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "deepmetric tune needs Optuna: pip install 'optuna>=4.9' (the package's [tune] extra)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints a line per trial
    return optuna


def direction(metric: str) -> str:
    """Optuna's direction for a result key: "maximize" unless its record says lower is
    better."""
    record = metric_of_key(metric)
    return "minimize" if record is not None and not record.higher_is_better else "maximize"


def open_study(settings: Any, out: Path) -> Any:
    """Create or load the study (TPE + median pruning) in its storage."""
    optuna = optuna_module()
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
    try:  # the worker that creates the study samples with --seed: reproducible alone
        return optuna.create_study(
            storage=storage,
            study_name=settings.study_name,
            direction=direction(settings.metric),
            sampler=_sampler(settings.seed),
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        pass
    # Another worker, or a resumed tune: a seed of its own, else it would draw the same
    # random start-up points as the first worker (TPE's first 10 trials are random).
    study_id = storage.get_study_id_from_name(settings.study_name)
    trials = len(storage.get_all_trials(study_id, deepcopy=False))
    mixed = f"{settings.seed}:{trials}:{socket.gethostname()}:{os.getpid()}".encode()
    seed = int.from_bytes(hashlib.sha256(mixed).digest()[:4], "little")
    return optuna.load_study(
        study_name=settings.study_name, storage=storage, sampler=_sampler(seed), pruner=pruner
    )


def _sampler(seed: int) -> Any:
    """Multivariate TPE, grouped for conditional spaces, with a constant liar for workers."""
    import optuna

    with warnings.catch_warnings():  # group= is "experimental" (since Optuna 2.8)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
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
            raise ConfigError(f"--storage {redacted(url)}: cannot open it: {msg}") from None
    raise AssertionError("unreachable")


def redacted(url: str) -> str:
    """``url`` with its password, if any, shown as ***."""
    if not url:
        return url
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # not a database URL: shown as given
        return url
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


# --------------------------------------------------------------------------- retries


def retry_abandoned(study: Any) -> None:
    """Fail the RUNNING trials whose worker process on this machine is gone, then queue once
    more every trial that was interrupted or killed (not one that diverged or raised), to
    resume in its run folder from the newest good checkpoint there."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if worker_host != host or not pid.isdigit():
            continue  # another machine's: its heartbeat (database storage) tells
        rebooted = t.user_attrs.get("boot", boot_id()) != boot_id()
        if rebooted or int(pid) == os.getpid() or not _alive(int(pid)):
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


def boot_id() -> str:
    """This boot of the machine (Linux), so that a pid from before a reboot is not taken
    for a live process; "" where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
