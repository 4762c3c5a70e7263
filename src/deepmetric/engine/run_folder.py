"""The run folder: where a run writes, and which checkpoint it resumes from."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from deepmetric.config import Config, ConfigError, config_from_dict, config_to_dict
from deepmetric.engine.checkpoint import find_checkpoint, run_dir_of

__all__ = ["config_changes", "resolve_run_dir", "resume_checkpoint"]


def resolve_run_dir(cfg: Config, config_name: str | None) -> Path:
    """``output.dir``; else the folder of the checkpoint ``train.resume`` names; else a new
    ``runs/<config stem>-<YYYYmmdd-HHMMSS>`` (suffixed -2, -3 ... if taken)."""
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


def resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: a new run).

    ``train.resume``: None refuses a folder that already holds a run; ``"auto"`` takes the
    folder's ``last`` checkpoint when there is one; a path takes that run's or checkpoint's.
    """
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
