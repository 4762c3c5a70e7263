"""Input presets: the pixel conventions each backbone's weights were trained with.

- ``bninception``: (3, 227, 227) **BGR, 0-255**, minus [104, 117, 128] (std 1).
  Train: resize 256, RandomResizedCrop 227 scale (0.16, 1), h-flip. Test: resize 256, centre 227.
- ``imagenet``: (3, 224, 224) RGB, ImageNet mean/std. Train: RandomResizedCrop 224 scale
  (0.16, 1), h-flip. Test: resize 256, centre 224.
- ``inception``: as ``imagenet`` but (x - 0.5) / 0.5 (TF-ported weights: EfficientNet-Lite,
  many ViTs).
- ``small``: (channels, H, W), (x - 0.5) / 0.5, optional resize. Train: optional light random
  affine.

Every preset accepts a PIL image or a (C, H, W) tensor (uint8 0-255 or float 0-1; one channel
is repeated to three for the RGB presets). "Resize 256" scales the shorter side to 256.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "BNINCEPTION_MEAN_BGR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PRESET_OPTIONS",
    "build_transform",
    "describe_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Per-channel mean of the BGR 0-255 input BN-Inception's converted Caffe weights expect (std 1).
BNINCEPTION_MEAN_BGR = (104.0, 117.0, 128.0)
PRESETS = ("bninception", "imagenet", "inception", "small")
_RGB_OPTIONS = ("size", "crop", "resize", "scale", "flip", "mean", "std", "interpolation")
#: The options each preset accepts (see :func:`build_transform`).
PRESET_OPTIONS: dict[str, tuple[str, ...]] = {
    "bninception": _RGB_OPTIONS,
    "imagenet": _RGB_OPTIONS,
    "inception": _RGB_OPTIONS,
    "small": (
        "size",
        "crop",
        "channels",
        "mean",
        "std",
        "augment",
        "degrees",
        "translate",
        "affine_scale",
    ),
}


class ToFloatImage:
    """PIL image or (C, H, W) tensor -> (C, H, W) float32 tensor in [0, 1].

    Args:
        channels: 3 converts PIL images to RGB and repeats a single channel; 1 converts to
            grayscale (PIL "L"; tensors with 3 channels are averaged with ITU-R 601 weights).
    """

    def __init__(self, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("L" if self.channels == 1 else "RGB")
            x = v2.functional.pil_to_tensor(image)
        elif isinstance(image, torch.Tensor):
            x = image
            if x.dim() == 2:
                x = x.unsqueeze(0)
            if x.dim() != 3:
                raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(x.shape)}")
        else:
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[0] == self.channels:
            return x
        if self.channels == 3 and x.shape[0] == 1:
            return x.expand(3, -1, -1).clone()
        if self.channels == 1 and x.shape[0] == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            return (x * w).sum(0, keepdim=True)
        raise ValueError(f"cannot convert {x.shape[0]} channels to {self.channels}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


class RGBToBGR:
    """(3, H, W) RGB tensor -> BGR (channel order reversed)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode(name.lower())


def _rgb_preset(
    train: bool,
    *,
    bgr: bool,
    resize: int,
    crop: int,
    scale: Sequence[float],
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
) -> v2.Compose:
    mode = _interp(interpolation)
    steps: list[Callable] = []
    if train:
        if resize:  # Deep_Metric resizes before the random crop; torchvision's recipe does not
            steps.append(v2.Resize(resize, interpolation=mode, antialias=True))
        steps.append(
            v2.RandomResizedCrop(crop, scale=tuple(scale), interpolation=mode, antialias=True)
        )
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop)]
    steps.append(ToFloatImage(3))
    if bgr:
        steps.append(RGBToBGR())
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def build_transform(preset: str, train: bool, **options: Any) -> Callable:
    """Build the input pipeline of a preset.

    Args:
        preset: "bninception", "imagenet", "inception" (imagenet with mean = std = 0.5) or
            "small".
        train: training augmentation (random crop/flip) or the deterministic test pipeline.
        **options: overrides.
            bninception / imagenet: ``size`` (or ``crop``: output side, 227 / 224), ``resize``
            (shorter side before cropping: 256, scaled with ``size``; train: for bninception
            only by default, 0 = none), ``scale`` (RandomResizedCrop area range,
            (0.16, 1)), ``flip`` (True), ``mean``, ``std``, ``interpolation`` ("bilinear").
            small: ``size`` (resize to size x size, default: keep), ``channels`` (1; 3 for
            RGB backbones), ``mean`` / ``std`` (0.5 / 0.5), ``augment`` (False; train only:
            RandomAffine with ``degrees`` 10, ``translate`` 0.1, ``affine_scale`` (0.9, 1.1)).

    Returns:
        A picklable callable: PIL image or (C, H, W) tensor -> (C, H', W') float32 tensor.

    A user's own callable can be passed as ``transform=`` to any data set instead.
    """
    if preset not in PRESET_OPTIONS:
        raise ValueError(f"unknown transform preset {preset!r}; use one of {list(PRESETS)}")
    unknown = sorted(set(options) - set(PRESET_OPTIONS[preset]))
    if unknown:
        raise TypeError(
            f"transform preset {preset!r}: unknown options {unknown}; expected "
            f"some of {list(PRESET_OPTIONS[preset])}"
        )
    opts = dict(options)
    if preset == "inception":
        opts.setdefault("mean", (0.5, 0.5, 0.5))
        opts.setdefault("std", (0.5, 0.5, 0.5))
        preset = "imagenet"
    if "crop" in opts and "size" in opts and opts["crop"] != opts["size"]:
        raise ValueError("give either size or crop, not both")
    if preset in ("bninception", "imagenet"):
        is_bn = preset == "bninception"
        default_size = 227 if is_bn else 224
        size = opts.pop("size", opts.pop("crop", default_size))
        opts.pop("crop", None)
        resize = round(size * 256 / default_size)  # 256 for the default sizes
        kwargs = {
            "resize": opts.pop("resize", resize if (is_bn or not train) else 0),
            "crop": size,
            "scale": opts.pop("scale", (0.16, 1.0)),
            "flip": opts.pop("flip", True),
            "mean": opts.pop(
                "mean", [m / 255.0 for m in BNINCEPTION_MEAN_BGR] if is_bn else IMAGENET_MEAN
            ),
            "std": opts.pop("std", [1.0 / 255.0] * 3 if is_bn else IMAGENET_STD),
            "interpolation": opts.pop("interpolation", "bilinear"),
        }
        if not train and not kwargs["resize"]:
            kwargs["resize"] = resize
        return _rgb_preset(train, bgr=is_bn, **kwargs)
    if preset == "small":
        size = opts.pop("size", opts.pop("crop", None))
        opts.pop("crop", None)
        channels = opts.pop("channels", 1)
        mean = opts.pop("mean", 0.5)
        std = opts.pop("std", 0.5)
        augment = opts.pop("augment", False)
        degrees = opts.pop("degrees", 10.0)
        translate = opts.pop("translate", 0.1)
        affine_scale = opts.pop("affine_scale", (0.9, 1.1))
        steps: list[Callable] = [ToFloatImage(channels)]
        if size:
            steps.append(v2.Resize((size, size), antialias=True))
        if train and augment:
            steps.append(
                v2.RandomAffine(
                    degrees=degrees, translate=(translate, translate), scale=tuple(affine_scale)
                )
            )
        mean_seq = [mean] * channels if isinstance(mean, (int, float)) else list(mean)
        std_seq = [std] * channels if isinstance(std, (int, float)) else list(std)
        steps.append(v2.Normalize(mean_seq, std_seq))
        return v2.Compose(steps)
    raise ValueError(f"unknown transform preset {preset!r}; use one of {list(PRESETS)}")


def describe_transform(transform: Callable) -> list[dict[str, Any]]:
    """The steps of a deterministic (test) pipeline from :func:`build_transform`, as plain
    data another program can re-implement: ``resize`` (``size``: an int = the shorter side,
    a pair = (H, W); ``interpolation``), ``center_crop`` (``size``), ``to_float``
    (``channels``; uint8 / 255), ``rgb_to_bgr``, ``normalize`` (``mean``, ``std`` per channel).

    Raises:
        ValueError: a step it cannot describe (a random augmentation, a user's callable).
    """
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    out: list[dict[str, Any]] = []
    for step in steps:
        if isinstance(step, v2.Resize):
            size = step.size if len(step.size) > 1 else step.size[0]
            mode = getattr(step.interpolation, "value", step.interpolation)
            out.append({"op": "resize", "size": size, "interpolation": str(mode)})
        elif isinstance(step, v2.CenterCrop):
            out.append({"op": "center_crop", "size": list(step.size)})
        elif isinstance(step, ToFloatImage):
            out.append({"op": "to_float", "channels": step.channels, "scale": 1 / 255})
        elif isinstance(step, RGBToBGR):
            out.append({"op": "rgb_to_bgr"})
        elif isinstance(step, v2.Normalize):
            out.append({"op": "normalize", "mean": list(step.mean), "std": list(step.std)})
        else:
            raise ValueError(f"cannot describe the transform step {step!r}")
    return out
