"""Export a trained network to ONNX or TorchScript, with its preprocessing in the file.

The exported graph maps a float32 batch (N, C, H, W), already preprocessed, to the (N, d)
embeddings; the batch axis is dynamic. What must happen before (the test transform's steps,
from ``deepmetric.data.describe_transform``) is stored in the file: ONNX metadata properties
(``deepmetric`` = the JSON below, plus flat keys ``embedding_dim``, ``input_shape``,
``mean``, ``std``, ``channel_order``), or the TorchScript archive's extra file
``deepmetric.json``. Every export is checked before it is kept: onnxruntime (or the reloaded
TorchScript module) must give PyTorch's embeddings within ``tolerance`` on a batch of real
images, at two batch sizes; the file is written to a temporary name and renamed when it
passed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.config import ConfigError
from deepmetric.engine.builders import build_data, build_transforms
from deepmetric.engine.inference import ImageFiles, checkpoint_digest, load_model, preprocessing
from deepmetric.retrieval.retriever import read_gallery

# Deferred imports: onnx and onnxruntime (optional, the [export] extra), inside the functions
# that use them.

__all__ = ["FORMATS", "ExportError", "export_model", "format_preprocessing"]

FORMATS = ("onnx", "torchscript")


class ExportError(RuntimeError):
    """The exported model does not reproduce PyTorch's embeddings (or cannot be written)."""


def format_preprocessing(steps: list[dict[str, Any]]) -> str:
    """One line for the steps of ``describe_transform``."""
    words = []
    for s in steps:
        if s["op"] == "resize":
            size = s["size"]
            side = f"shorter side {size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
            words.append(f"resize {side} ({s['interpolation']})")
        elif s["op"] == "center_crop":
            words.append(f"center crop {s['size'][0]}x{s['size'][1]}")
        elif s["op"] == "to_float":
            words.append(f"{'RGB' if s['channels'] == 3 else 'grayscale'} float / 255")
        elif s["op"] == "rgb_to_bgr":
            words.append("RGB -> BGR")
        elif s["op"] == "normalize":
            mean = ", ".join(f"{m:.4g}" for m in s["mean"])
            std = ", ".join(f"{v:.4g}" for v in s["std"])
            words.append(f"(x - [{mean}]) / [{std}]")
    return " -> ".join(words)


def export_model(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    overrides: list[str] | None = None,
    images: str | os.PathLike | None = None,
    batch: int = 8,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export the checkpoint's network to ``out`` and check it.

    Args:
        checkpoint: a run folder (best, else last) or a checkpoint folder.
        fmt: "onnx" or "torchscript".
        images: image files for the check (a folder, list or CSV); default: the first
            ``batch`` images of the run's test split.
        tolerance: the largest absolute difference allowed from PyTorch's embeddings.

    Returns:
        {"path", "format", "metadata", "max_abs_diff", "batch_sizes"}.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg, model, ckpt = load_model(checkpoint, overrides)
    sample = _check_images(cfg, images, batch)
    with torch.no_grad():
        expected = model(sample).numpy()
    pre = preprocessing(cfg)
    metadata = {
        "format": "deepmetric-export-1",
        "checkpoint": str(Path(ckpt).resolve()),
        "checkpoint_sha256": checkpoint_digest(ckpt),
        "embedding_dim": int(expected.shape[1]),
        "l2_normalized": bool(cfg.model.l2_normalize),
        "input": {"layout": "NCHW", "dtype": "float32", "shape": ["batch", *sample.shape[1:]]},
        "preprocessing": pre,
        "preprocessing_text": format_preprocessing(pre["steps"]),
    }
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name (e.g. {out}/model.{fmt})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if fmt == "onnx":
            _write_onnx(model, sample, tmp, metadata)
            run = _onnx_runner(tmp)
        else:
            _write_torchscript(model, sample, tmp, metadata)
            run = _torchscript_runner(tmp)
        sizes = (len(sample), 1)
        diff = max(float(np.abs(run(sample[:n]) - expected[:n]).max()) for n in sizes)
        if not diff <= tolerance:
            raise ExportError(
                f"{fmt} export of {ckpt} differs from PyTorch by {diff:.2e} (> {tolerance:g}) "
                "on real images; not written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": str(out),
        "format": fmt,
        "metadata": metadata,
        "max_abs_diff": diff,
        "batch_sizes": list(sizes),
    }


def _check_images(cfg: Any, images: str | os.PathLike | None, batch: int) -> torch.Tensor:
    """(B, C, H, W) preprocessed real images: from ``images`` or the run's test split."""
    if images is not None:
        paths = read_gallery(images)[0][:batch]
        _, test_tf = build_transforms(cfg)
        dataset: Any = ImageFiles([Path(p) for p in paths], test_tf, preprocessing(cfg)["invert"])
    else:
        try:
            dataset = build_data(cfg, test_only=True)[1]["test"].dataset
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"the run's test data cannot be read to check the export ({e}); pass "
                "--images DIR with a few images of the same kind"
            ) from None
    picks = np.linspace(0, len(dataset) - 1, min(batch, len(dataset))).round().astype(int)
    return torch.stack([dataset[int(i)][0] for i in picks]).float()


def _write_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs onnx, onnxscript and onnxruntime: "
            "pip install 'deepmetric[export]' (or pip install onnx onnxscript onnxruntime)"
        ) from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample[:2],),
            dynamo=True,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    steps = meta["preprocessing"]["steps"]
    normalize = next((s for s in steps if s["op"] == "normalize"), {"mean": [], "std": []})
    onnx.helper.set_model_props(
        proto,
        {
            "deepmetric": json.dumps(meta),
            "embedding_dim": str(meta["embedding_dim"]),
            "input_shape": json.dumps(meta["input"]["shape"]),
            "mean": json.dumps(normalize["mean"]),
            "std": json.dumps(normalize["std"]),
            "channel_order": "BGR" if any(s["op"] == "rgb_to_bgr" for s in steps) else "RGB",
        },
    )
    onnx.save(proto, str(path))


def _onnx_runner(path: Path) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _write_torchscript(
    model: torch.nn.Module, sample: torch.Tensor, path: Path, meta: dict
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, sample[:2])
        torch.jit.save(traced, str(path), _extra_files={"deepmetric.json": json.dumps(meta)})


def _torchscript_runner(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path))

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run
