"""The run folder: where a run writes, and which checkpoint it resumes from."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from deepmetric import distributed as dist
from deepmetric.config import Config, ConfigError, config_from_dict, config_to_dict
from deepmetric.engine.checkpoint import (
    CHECKPOINT_LINKS,
    CheckpointError,
    checkpoint_iteration,
    link_checkpoint,
    list_checkpoints,
    run_dir_of,
    verify_checkpoint,
)
from deepmetric.engine.runlog import say

__all__ = [
    "RUN_FILE",
    "check_writable",
    "config_changes",
    "lookup",
    "newest_good_checkpoint",
    "removed_if_unused",
    "resolve_run_dir",
    "resume_checkpoint",
    "run_contents",
    "set_aside_newer_checkpoints",
    "write_run_file",
]


def resolve_run_dir(cfg: Config, config_name: str | None) -> Path:
    """``output.dir``; else the run folder ``train.resume`` names (or holds the checkpoint it
    names); else a new ``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (suffixed -2, -3 ... if
    taken)."""
    if cfg.output.dir:
        return Path(cfg.output.dir)
    if cfg.train.resume not in (None, "auto"):
        resume = Path(cfg.train.resume)
        return run_dir_of(resume) if _is_checkpoint(resume) else resume
    stem = Path(config_name).stem if config_name else "run"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_writable(cfg: Config, run_dir: Path) -> None:
    """Create ``run_dir`` and write a file into it on rank 0, before any data is read: a
    ConfigError on every rank naming the setting that chose the folder when it cannot be
    written (a read-only mount, a folder of another user, /proc)."""
    problem = None
    if dist.is_main_process():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            problem = (
                f"{_chosen_by(cfg)}: cannot write {run_dir} ({reason}): choose a writable "
                "folder with --output.dir"
            )
    problem = dist.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def _chosen_by(cfg: Config) -> str:
    """The setting that chose the run folder: ``--output.dir``, ``FILE: output.dir``,
    ``--train.resume`` or the default."""
    key = "output.dir" if cfg.output.dir else "train.resume"
    if key == "train.resume" and cfg.train.resume in (None, "auto"):
        return "output.dir (null: a new folder under runs/)"
    where = cfg.sources.get(key, "defaults")
    return f"--{key}" if where.startswith("command line") else f"{where}: {key}"


def _is_checkpoint(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "model.safetensors").is_file()


def run_contents(run_dir: Path) -> list[str]:
    """What of a run ``run_dir`` holds: ``metrics.jsonl``, ``checkpoints/``, ``last`` (also a
    dangling link); empty for a new or unused folder."""
    found = [name for name in ("metrics.jsonl", "checkpoints") if (run_dir / name).exists()]
    return found + (["last"] if (run_dir / "last").is_symlink() else [])


def newest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint folder of ``run_dir`` whose files match their manifest, and why
    each newer one was skipped (one line each, naming the file)."""
    skipped = []
    for ckpt in list_checkpoints(run_dir):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return ckpt, skipped
    return None, skipped


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from (None: a new run).

    ``train.resume``: None refuses a folder that already holds a run; ``"auto"`` takes the
    folder's newest checkpoint that passes its checks (printing each newer one it skips), or
    starts a new run in a folder that holds none; a checkpoint folder is taken as it is (an
    error if damaged); another run folder is searched like ``"auto"``. A folder holding a run
    (metrics, checkpoints) without a usable checkpoint is an error, never a silent restart.
    """
    resume = cfg.train.resume
    contents = run_contents(run_dir)
    if resume is None:
        if contents:
            raise ConfigError(
                f"{run_dir} already holds a run ({', '.join(contents)}); continue it with "
                "--train.resume=auto, or choose another --output.dir"
            )
        return None
    if resume != "auto" and _is_checkpoint(Path(resume)):
        ckpt = Path(resume).resolve()
        verify_checkpoint(ckpt)  # the one asked for: an error naming a damaged file
        return ckpt
    source = run_dir if resume == "auto" else Path(resume)
    ckpt, skipped = newest_good_checkpoint(source)
    for reason in skipped:
        say(f"resume: skipping a damaged checkpoint: {reason}")
    if ckpt is not None:
        return ckpt
    held = run_contents(source)
    if not held:
        if resume == "auto":
            return None  # a new run (e.g. the first attempt of a job that resumes itself)
        raise CheckpointError(f"--train.resume={resume}: no run or checkpoint there")
    problems = "; ".join(skipped) or f"none in {source / 'checkpoints'}"
    raise CheckpointError(
        f"{source} holds a run ({', '.join(held)}) but no usable checkpoint ({problems}); "
        "nothing can be resumed: start again with another --output.dir"
    )


@contextmanager
def removed_if_unused(run_dir: Path) -> Iterator[None]:
    """On rank 0: when the block fails and ``run_dir`` did not exist before it, remove the
    folder again unless it holds part of a run (metrics.jsonl, a checkpoint), so that a
    failed set-up leaves no empty run folder behind."""
    new = dist.is_main_process() and not run_dir.exists()
    try:
        yield
    except BaseException:
        if new and run_dir.is_dir() and not run_contents(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def set_aside_newer_checkpoints(
    run_dir: Path, iteration: int, best_iteration: int | None = None
) -> None:
    """Rename the checkpoint folders of ``run_dir`` newer than ``iteration`` (damaged ones, or
    those of a future this run abandons by resuming earlier) to ``superseded-iter-N``: kept,
    but never resumed from nor pruned. Links left pointing at nothing move back: ``last`` to
    ``iteration``, the best links to ``best_iteration`` (removed if that folder is gone).
    Call on rank 0 after resuming from ``iteration``."""
    for ckpt in list_checkpoints(run_dir):
        if checkpoint_iteration(ckpt) <= iteration:
            continue
        target, n = ckpt.with_name(f"superseded-{ckpt.name}"), 1
        while target.exists():
            n += 1
            target = ckpt.with_name(f"superseded-{ckpt.name}-{n}")
        os.replace(ckpt, target)
        say(f"resume: moved {ckpt} (newer than the resumed iteration {iteration}) to {target}")
    for name in CHECKPOINT_LINKS:
        link, it = run_dir / name, iteration if name == "last" else best_iteration
        if not link.is_symlink() or link.exists():
            continue
        folder = run_dir / "checkpoints" / f"iter-{it or 0:07d}"
        if it is not None and folder.is_dir():
            link_checkpoint(run_dir, name, folder)
        else:
            link.unlink()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (sections only; option mappings stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old_text: str, cfg: Config) -> list[str]:
    """``"section.key: old -> new"`` for every setting that differs from the checkpoint's
    config (``train.resume`` and ``output.dir`` excepted)."""
    try:
        old = config_from_dict(yaml.safe_load(old_text) or {}, "checkpoint config.yaml")
    except ConfigError:
        return ["(the checkpoint's config.yaml does not match this version's keys)"]
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(cfg))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in dict.fromkeys([*a, *b])
        if a.get(k) != b.get(k) and k not in ("train.resume", "output.dir")
    ]


#: The run folder's file of what the run was started from (read by the report).
RUN_FILE = "run.json"


def write_run_file(run_dir: Path, cfg: Config, config_file: str | os.PathLike | None) -> None:
    """Write ``RUN/run.json``: the preset file (absolute path, None when the config was built
    in Python) and the settings set on the command line, with their values::

        {"config_file": "/abs/configs/demo.yaml", "command_line": {"train.iterations": 300}}
    """
    resolved = config_to_dict(cfg)
    command_line = {
        key: lookup(resolved, key)
        for key, source in cfg.sources.items()
        if source.startswith("command line")
    }
    info = {
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "command_line": command_line,
    }
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` ("optim.lr") in a nested mapping, None where it is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
