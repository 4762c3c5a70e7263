"""Checkpoints you can trust: weights in safetensors, the rest with ``torch.save`` (tensors and
plain containers only, read back with ``torch.load(weights_only=True)``), a manifest of
checksums, atomic writes, the newest few kept.

Layout of a run folder::

    RUN/checkpoints/iter-0001000/model.safetensors   model weights (+ metadata: iteration)
                                /state.pt            optimizer, loss/memory, sampler position,
                                                     RNG states, iteration, best metric
                                /config.yaml         the resolved configuration
                                /manifest.json       {"iteration", "files": {name: {"bytes",
                                                     "sha256"}}} of the three files above
    RUN/last -> checkpoints/iter-0001000             relative symbolic links: last (the
    RUN/best -> checkpoints/iter-0000800             newest checkpoint), best (selected on
                                                     validation) or best_test_selected

Writing is atomic: the files are serialised in memory, written into a temporary folder in
``RUN/checkpoints`` and fsynced; the folder is renamed (``os.replace``) to its final name
only when complete, then each link is replaced through ``os.replace``. A process killed at any
moment, or a write that fails (disk full), leaves every earlier checkpoint complete; a leftover
temporary folder is removed at the next save. After a save the ``keep_last`` newest checkpoint
folders and those a link points to are kept, the others deleted.

Reading checks every file against the manifest (size, then sha256) and raises
:class:`CheckpointError` naming the first file that is missing, truncated or altered; a
checkpoint without a manifest (written before manifests existed) is read unchecked, its
files' parse errors reported the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

__all__ = [
    "CHECKPOINT_LINKS",
    "CheckpointError",
    "checkpoint_iteration",
    "find_checkpoint",
    "link_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "run_dir_of",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_LINKS = ("last", "best", "best_test_selected")
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "state.pt", "config.yaml"
MANIFEST_FILE = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


# ------------------------------------------------------------------------------ writing


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (every checkpoint byte goes through
    here; an OSError such as ENOSPC propagates)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def link_checkpoint(run_dir: Path, name: str, target: Path) -> None:
    """Point ``run_dir/name`` at ``target`` (relative link), replacing any old link atomically."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp, target_is_directory=True)
    os.replace(tmp, run_dir / name)


def _serialise(
    iteration: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], config_text: str
) -> dict[str, bytes]:
    """The checkpoint's files as bytes, the manifest of the other three last."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = {
        MODEL_FILE: safetensors.torch.save(weights, metadata={"iteration": str(iteration)}),
        STATE_FILE: buffer.getvalue(),
        CONFIG_FILE: config_text.encode(),
    }
    manifest = {
        "iteration": iteration,
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    files[MANIFEST_FILE] = (json.dumps(manifest, indent=1) + "\n").encode()
    return files


def _prune(run_dir: Path, keep_last: int) -> None:
    """Delete checkpoint folders beyond the ``keep_last`` newest that no link points to, and
    temporary leftovers of killed saves."""
    ckpt_root = run_dir / "checkpoints"
    keep = {(run_dir / n).resolve() for n in CHECKPOINT_LINKS if (run_dir / n).is_symlink()}
    keep.update(p.resolve() for p in list_checkpoints(run_dir)[:keep_last])
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
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``iteration`` atomically, point ``links`` at it, prune old ones.

    Args:
        run_dir: the run folder.
        iteration: number of optimizer steps taken (names the folder ``iter-%07d``; a folder
            of that name left by an abandoned run is replaced).
        model_state: model ``state_dict()`` (tensors; saved contiguous, on CPU).
        state: everything else (tensors, numbers, strings, lists, dicts, tuples only).
        config_text: resolved configuration (YAML text), copied into the checkpoint.
        links: names among ``CHECKPOINT_LINKS`` to move to this checkpoint.
        keep_last: how many of the newest checkpoint folders to keep (linked ones are kept too).

    Returns the checkpoint folder. Raises :class:`CheckpointError` when a file cannot be
    written (disk full ...): the earlier checkpoints and links are then untouched.
    """
    for name in links:
        if name not in CHECKPOINT_LINKS:
            raise ValueError(f"unknown link {name!r}; expected one of {CHECKPOINT_LINKS}")
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"iter-{iteration:07d}"
    tmp = ckpt_root / f".tmp-iter-{iteration:07d}-{os.getpid()}"
    files = _serialise(iteration, model_state, state, config_text)
    path = tmp
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, data in files.items():
            path = tmp / name
            _write_file(path, data)
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = run_dir / "last"
        kept = (
            f"the previous checkpoint {previous.resolve()} is intact"
            if (previous / MODEL_FILE).is_file()
            else "no earlier checkpoint was written"
        )
        raise CheckpointError(
            f"could not write checkpoint {final} ({e.strerror or e} while writing "
            f"{path.name}); {kept}; free disk space, then continue with --train.resume=auto"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # left by an abandoned run that got further: this run's state wins
        stale = ckpt_root / f".tmp-stale-{iteration:07d}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)  # atomic: the folder appears complete or not at all
    _fsync_dir(ckpt_root)
    for name in links:
        link_checkpoint(run_dir, name, final)
    _fsync_dir(run_dir)
    _prune(run_dir, keep_last)
    return final


# ------------------------------------------------------------------------------ reading


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run folder's checkpoint folders ``checkpoints/iter-N``, newest (largest N) first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("iter-") and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def find_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """The checkpoint folder for ``path``: a checkpoint folder itself, or a run folder (then the
    first existing link of ``prefer``). Raises FileNotFoundError naming what was looked for."""
    p = Path(path)
    if (p / MODEL_FILE).is_file() or (p / MANIFEST_FILE).is_file():
        return p.resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    for name in prefer:
        if (p / name).is_dir():
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


def _read_manifest(ckpt: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``files`` entry; None for a checkpoint without a manifest."""
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_bytes())["files"]
        if not all({"bytes", "sha256"} <= set(v) for v in files.values()):
            raise ValueError("entries without bytes or sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged ({e}); this checkpoint cannot be checked") from None
    return files


def verify_checkpoint(
    ckpt: str | os.PathLike, names: tuple[str, ...] = (MODEL_FILE, STATE_FILE, CONFIG_FILE)
) -> dict[str, bytes]:
    """Read the files ``names`` of checkpoint folder ``ckpt`` and check them against its
    manifest (byte count, sha256). Returns ``{name: content}``; a file that is absent from a
    checkpoint without a manifest is left out. Raises :class:`CheckpointError` naming the
    first file that is missing, truncated or altered."""
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    contents: dict[str, bytes] = {}
    for name in names:
        path = ckpt / name
        expected = manifest.get(name) if manifest is not None else None
        if manifest is not None and expected is None:
            raise CheckpointError(f"{path}: not listed in {MANIFEST_FILE} (damaged checkpoint)")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if manifest is None and name == CONFIG_FILE:
                continue  # old checkpoints: the run folder's config.yaml
            raise CheckpointError(f"{path}: missing (incomplete checkpoint)") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        if expected is not None:
            if len(data) != expected["bytes"]:
                raise CheckpointError(
                    f"{path}: {len(data):,} bytes, {expected['bytes']:,} written "
                    "(truncated or damaged)"
                )
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise CheckpointError(
                    f"{path}: content differs from its sha256 in {MANIFEST_FILE} (damaged)"
                )
        contents[name] = data
    return contents


def load_checkpoint(
    path: str | os.PathLike, prefer: tuple[str, ...] = ("best", "last"), *, state: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(model_state, state, config_text) of the checkpoint at ``path`` (:func:`find_checkpoint`),
    every file checked against the manifest (:func:`verify_checkpoint`).

    ``state.pt`` is read with ``weights_only=True``; ``state=False`` skips it (returns {}).
    The config text is "" when neither the checkpoint nor its run folder has a config.yaml.
    Raises :class:`CheckpointError` naming a damaged file.
    """
    ckpt = find_checkpoint(path, prefer)
    names = (MODEL_FILE, STATE_FILE, CONFIG_FILE) if state else (MODEL_FILE, CONFIG_FILE)
    contents = verify_checkpoint(ckpt, names)
    checked = (ckpt / MANIFEST_FILE).is_file()
    weights = _parse(ckpt / MODEL_FILE, safetensors.torch.load, contents[MODEL_FILE], checked)
    other: dict[str, Any] = {}
    if state:
        other = _parse(
            ckpt / STATE_FILE,
            lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True),
            contents[STATE_FILE],
            checked,
        )
    if CONFIG_FILE in contents:
        text = contents[CONFIG_FILE].decode()
    else:
        run_config = run_dir_of(ckpt) / CONFIG_FILE
        text = run_config.read_text() if run_config.is_file() else ""
    return weights, other, text


def _parse(path: Path, parse: Any, data: bytes, checked: bool) -> Any:
    """``parse(data)``. Bytes that match the manifest (``checked``) parse, or it is a bug; an
    unchecked file that does not (truncated, empty) is a CheckpointError naming it."""
    if checked:
        return parse(data)
    try:
        return parse(data)
    except Exception as e:  # safetensors / torch.load raise several types for broken bytes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read ({first}); damaged or truncated") from None
