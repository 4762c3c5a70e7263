"""Atomic checkpoints: weights in safetensors, the rest with ``torch.save`` (tensors and plain
containers only, read back with ``torch.load(weights_only=True)``).

Layout of a run folder::

    RUN/checkpoints/iter-0001000/model.safetensors   model weights (+ metadata: iteration)
                                /state.pt            optimizer, loss/memory, sampler position,
                                                     RNG states, iteration, best metric
                                /config.yaml         the resolved configuration
    RUN/last -> checkpoints/iter-0001000             relative symbolic links, one per role:
    RUN/best -> checkpoints/iter-0000800             last, best (selected on validation) or
                                                     best_test_selected (test protocol)

Writing is atomic: the three files go into a temporary folder in ``RUN/checkpoints`` that is
renamed (``os.replace``) to its final name only when complete, then each link is replaced by
a new link through ``os.replace``. A process killed at any moment leaves every link pointing
at a complete checkpoint; a leftover temporary folder is removed at the next save. Folders no
link points to are deleted after the links move.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_LINKS",
    "checkpoint_iteration",
    "find_checkpoint",
    "load_checkpoint",
    "run_dir_of",
    "save_checkpoint",
]

CHECKPOINT_LINKS = ("last", "best", "best_test_selected")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.yaml"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _link(run_dir: Path, name: str, target: Path) -> None:
    """Point ``run_dir/name`` at ``target`` (relative link), replacing any old link atomically."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp, target_is_directory=True)
    os.replace(tmp, run_dir / name)


def _prune(run_dir: Path) -> None:
    """Delete checkpoint folders no link points to, and temporary leftovers of killed saves."""
    keep = {(run_dir / n).resolve() for n in CHECKPOINT_LINKS if (run_dir / n).is_symlink()}
    ckpt_root = run_dir / "checkpoints"
    for child in ckpt_root.iterdir():
        if child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith("iter-") and child.resolve() not in keep:
            shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    iteration: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    config_text: str,
    links: tuple[str, ...] = ("last",),
) -> Path:
    """Write checkpoint ``iteration`` (if not already there) and point ``links`` at it.

    Args:
        run_dir: the run folder.
        iteration: number of optimizer steps taken (names the folder ``iter-%07d``).
        model_state: model ``state_dict()`` (tensors; saved contiguous, on CPU).
        state: everything else (tensors, numbers, strings, lists, dicts, tuples only).
        config_text: resolved configuration (YAML text), copied into the checkpoint.
        links: names among ``CHECKPOINT_LINKS`` to move to this checkpoint.

    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"iter-{iteration:07d}"
    linked = {(run_dir / n).resolve() for n in CHECKPOINT_LINKS if (run_dir / n).is_symlink()}
    if final.is_dir() and final.resolve() not in linked:
        # Left by a killed run that got this far after the checkpoint we resumed from:
        # replace it (this run's state may differ, e.g. after a config change on resume).
        stale = ckpt_root / f".tmp-stale-{iteration:07d}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    if not final.is_dir():
        tmp = ckpt_root / f".tmp-iter-{iteration:07d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
            save_file(weights, str(tmp / MODEL_FILE), metadata={"iteration": str(iteration)})
            torch.save(state, tmp / STATE_FILE)
            (tmp / CONFIG_FILE).write_text(config_text)
            for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, final)  # atomic: the folder appears complete or not at all
        _fsync_dir(ckpt_root)
    for name in links:
        if name not in CHECKPOINT_LINKS:
            raise ValueError(f"unknown link {name!r}; expected one of {CHECKPOINT_LINKS}")
        _link(run_dir, name, final)
    _fsync_dir(run_dir)
    _prune(run_dir)
    return final


def find_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """The checkpoint folder for ``path``: a checkpoint folder itself, or a run folder (then the
    first existing link of ``prefer``). Raises FileNotFoundError naming what was looked for."""
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p.resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    for name in prefer:
        if (p / name / MODEL_FILE).is_file():
            return (p / name).resolve()
    raise FileNotFoundError(
        f"no checkpoint in {p}: expected {MODEL_FILE} there or a run folder with "
        + " or ".join(f"{n}/{MODEL_FILE}" for n in prefer)
    )


def run_dir_of(checkpoint_dir: str | os.PathLike) -> Path:
    """The run folder holding a checkpoint folder (``RUN/checkpoints/iter-N`` -> ``RUN``)."""
    p = Path(checkpoint_dir).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def checkpoint_iteration(checkpoint_dir: str | os.PathLike) -> int:
    """Iteration of a checkpoint folder, from its name (``iter-0000100`` -> 100)."""
    name = Path(checkpoint_dir).resolve().name
    return int(name.split("-", 1)[1]) if name.startswith("iter-") else -1


def load_checkpoint(
    path: str | os.PathLike, prefer: tuple[str, ...] = ("best", "last"), *, state: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(model_state, state, config_text) of the checkpoint at ``path`` (:func:`find_checkpoint`).

    ``state.pt`` is read with ``weights_only=True``; ``state=False`` skips it (returns {}).
    The config text is "" when the checkpoint has no config.yaml.
    """
    ckpt = find_checkpoint(path, prefer)
    weights = load_file(str(ckpt / MODEL_FILE))
    other: dict[str, Any] = {}
    if state:
        other = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    config_file = ckpt / CONFIG_FILE
    if not config_file.is_file():
        config_file = run_dir_of(ckpt) / CONFIG_FILE
    text = config_file.read_text() if config_file.is_file() else ""
    return weights, other, text
