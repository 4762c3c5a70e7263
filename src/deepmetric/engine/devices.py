"""Where a run computes and in which precision: ``train.device`` and ``train.amp`` resolved
once, for training, evaluation and inference alike."""

from __future__ import annotations

import torch

from deepmetric import distributed as dist
from deepmetric.config import ConfigError

__all__ = ["AMP_DTYPES", "amp_dtype", "resolve_device"]

#: ``train.amp`` -> the autocast dtype (None: full float32).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``train.device`` -> a torch device. ``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is
    available (one GPU per process under torchrun), else the CPU. A CUDA device is made the
    current one. Raises ConfigError for a malformed name or CUDA asked without CUDA."""
    if name == "auto":
        available = torch.cuda.is_available()
        device = torch.device("cuda", dist.get_local_rank()) if available else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"train.device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} but CUDA is not available (use auto or cpu)")
        torch.cuda.set_device(device)
    return device


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype on ``device``; fp16 needs CUDA (ConfigError)."""
    dtype = AMP_DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError(
            f"train.amp: fp16 needs a CUDA device (running on {device.type}); use bf16 or none"
        )
    return dtype
