"""Using a trained run: evaluate a checkpoint, embed a folder or list of images."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepmetric.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    parse_overrides,
    validate_config,
)
from deepmetric.data import IMAGE_EXTENSIONS, describe_transform, open_image
from deepmetric.engine.builders import (
    EvalSet,
    build_data,
    build_model_from_config,
    build_transforms,
    collate_images,
)
from deepmetric.engine.checkpoint import (
    CheckpointError,
    checkpoint_iteration,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    run_dir_of,
)
from deepmetric.engine.devices import amp_dtype, resolve_device
from deepmetric.engine.evaluator import Evaluator, needs_calibration
from deepmetric.engine.runlog import format_metrics
from deepmetric.evaluation import extract_embeddings

__all__ = [
    "ImageFiles",
    "checkpoint_digest",
    "embed_images",
    "embed_paths",
    "evaluate_checkpoint",
    "evaluation_set",
    "list_images",
    "load_model",
    "preprocessing",
]


def load_model(
    checkpoint: str | os.PathLike, overrides: list[str] | None = None
) -> tuple[Config, nn.Module, Path]:
    """(config, model in eval mode on CPU, checkpoint folder) of a run folder or checkpoint.

    A run folder gives its ``best`` checkpoint, else ``last``. The checkpoint's config.yaml
    is read and ``overrides`` (``["--data.root", PATH]``...) are applied to it.
    """
    ckpt = find_checkpoint(checkpoint, ("best", "last"))
    try:
        weights, _, text = load_checkpoint(ckpt, state=False)
    except CheckpointError as e:
        others = [str(p) for p in list_checkpoints(run_dir_of(ckpt)) if p.resolve() != ckpt]
        hint = f"; other checkpoints of the run: {', '.join(others)}" if others else ""
        raise CheckpointError(f"{e}; pass another --checkpoint{hint}") from None
    if not text:
        raise ConfigError(f"{ckpt}: no config.yaml in the checkpoint or its run folder")
    cfg = config_from_dict(yaml.safe_load(text) or {}, f"{ckpt}/config.yaml")
    cfg.train.resume = None
    if overrides:
        apply_overrides(cfg, parse_overrides(overrides))
    validate_config(cfg)
    model = build_model_from_config(cfg, pretrained=False)
    model.load_state_dict(weights)
    model.eval()
    return cfg, model, ckpt


def evaluation_set(cfg: Config, split: str, checkpoint: Path) -> EvalSet:
    """The ``split`` of a run's data as its evaluation saw it: "test", or "val" (the
    class-disjoint validation classes of a run trained with ``eval.protocol: val``)."""
    if split == "test":
        return build_data(cfg, test_only=True)[1]["test"]
    if split == "val":
        if cfg.eval.protocol != "val":
            raise ConfigError(
                f"--split val: {checkpoint} was trained with eval.protocol={cfg.eval.protocol}, "
                "without a validation split (every training class was trained on); "
                "use --split test"
            )
        return build_data(cfg)[1]["val"]
    raise ConfigError(f"--split: expected test or val, got {split!r}")


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    split: str = "test",
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrieval metrics of a checkpoint on the test split (or the class-disjoint ``val``
    split the run was configured with); writes them as JSON to ``out`` (default:
    ``RUN/eval-<split>-iter<N>.json``). Returns {"checkpoint", "iteration", "split",
    "metrics", "json"}."""
    cfg, model, ckpt = load_model(checkpoint, overrides)
    device = resolve_device(cfg.train.device)
    model.to(device)
    eval_set = evaluation_set(cfg, split, ckpt)
    calibration = None  # an auto open-set threshold on the test split: the validation classes
    if split == "test" and needs_calibration(cfg) and cfg.eval.protocol == "val":
        calibration = evaluation_set(cfg, "val", ckpt)
    evaluator = Evaluator(
        cfg,
        {split: eval_set},
        device,
        amp_dtype(cfg.train.amp, device),
        persistent_workers=False,
        calibration=calibration,
    )
    metrics = evaluator.evaluate(model, progress=progress)[split]
    iteration = checkpoint_iteration(ckpt)
    result = {
        "checkpoint": str(ckpt),
        "iteration": iteration,
        "split": split,
        "data": cfg.data.name,
        "images": len(eval_set.dataset),
        "metrics": metrics,
    }
    path = Path(out) if out else ckpt.parent.parent / f"eval-{split}-iter{iteration}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(path)
    result["summary"] = format_metrics(metrics)
    return result


def list_images(source: str | os.PathLike) -> list[Path]:
    """Image paths from a folder (recursive, sorted, by extension) or a list file (one path
    per line, optionally followed by a label; relative paths are taken from the list file's
    folder when they do not exist from the working directory)."""
    src = Path(source)
    if src.is_dir():
        paths = sorted(
            p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {src}")
        return paths
    if not src.is_file():
        raise FileNotFoundError(f"--images: no such folder or list file: {src}")
    paths = []
    for n, line in enumerate(src.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        candidates = [line] + ([line.rsplit(None, 1)[0]] if " " in line or "\t" in line else [])
        for text in candidates:
            p = Path(text)
            for full in (p, src.parent / p):
                if full.is_file():
                    paths.append(full)
                    break
            else:
                continue
            break
        else:
            raise FileNotFoundError(f"{src}, line {n}: image not found: {line}")
    if not paths:
        raise FileNotFoundError(f"{src}: lists no image")
    return paths


class ImageFiles(Dataset):
    """Image files -> (transformed image, -1); ``invert`` = 255 - pixel first (runs trained
    on an array data set loaded with ``invert: true``, e.g. Omniglot)."""

    def __init__(self, paths: list[Path], transform: Any, invert: bool = False) -> None:
        self.paths, self.transform, self.invert = paths, transform, invert

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = open_image(self.paths[i])
        if self.invert:
            image = ImageOps.invert(image)
        return self.transform(image), -1


def preprocessing(cfg: Config) -> dict[str, Any]:
    """What turns an image file into the network's input for this run: the test transform's
    steps (``deepmetric.data.describe_transform``), the inversion of array-trained runs, and
    test-time flip averaging."""
    _, test_tf = build_transforms(cfg)
    return {
        "steps": describe_transform(test_tf),
        "invert": bool(cfg.data.options.get("invert", False)),
        "flip": cfg.eval.flip,
    }


def checkpoint_digest(checkpoint: str | os.PathLike) -> str:
    """sha256 (hex) of a checkpoint folder's model weights file."""
    path = Path(checkpoint) / "model.safetensors"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embed_paths(
    cfg: Config,
    model: nn.Module,
    paths: list[Path] | list[str],
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, d) float32 embeddings of image files, in order, with the run's test transform (and,
    for a run on array data loaded with ``invert: true``, the same inversion)."""
    device = next(model.parameters()).device
    _, test_tf = build_transforms(cfg)
    loader = DataLoader(
        ImageFiles([Path(p) for p in paths], test_tf, preprocessing(cfg)["invert"]),
        batch_size=batch_size or cfg.eval.batch_size,
        shuffle=False,
        collate_fn=collate_images,
        num_workers=cfg.data.num_workers,
    )
    emb, _ = extract_embeddings(
        model,
        loader,
        device=device,
        flip=cfg.eval.flip,
        amp_dtype=amp_dtype(cfg.train.amp, device),
        progress=progress,
    )
    return emb.detach().cpu().float().numpy()


def embed_images(
    checkpoint: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[Path, Path, tuple[int, int]]:
    """Embed every image of a folder or list file with the run's test transform (and, for
    a run on array data loaded with ``invert: true``, the same inversion).

    Writes ``out`` (N x d float32 .npy, rows in the listed order; ``.npy`` is added to a name
    without it; a folder, existing or given with a trailing slash, gets ``embeddings.npy``)
    and, beside it, the same name with suffix ``.txt`` (the N paths, one a line). Returns
    (npy path, txt path, (N, d)).
    """
    cfg, model, _ = load_model(checkpoint, overrides)
    model.to(resolve_device(cfg.train.device))
    paths = list_images(images)
    array = embed_paths(cfg, model, paths, batch_size=batch_size, progress=progress)
    folder = Path(out).is_dir() or str(out).endswith(("/", os.sep))
    out = Path(out) / "embeddings.npy" if folder else Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, array)
    txt = out.with_suffix(".txt")
    txt.write_text("".join(f"{p}\n" for p in paths))
    return out, txt, tuple(array.shape)
