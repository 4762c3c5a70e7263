"""torchvision and timm models wrapped to the backbone contract.

Every backbone is an ``nn.Module`` with two attributes:

- ``feature_dim``: channels C of its output;
- ``output``: ``"map"`` when ``forward`` returns a (B, C, H, W) feature map (convolutional
  networks; the embedding head pools it), or ``"pooled"`` when it returns (B, C) (ViT-like timm
  models whose ``forward_features`` gives tokens: the pooled output of timm's
  ``forward_head(pre_logits=True)`` is used, so the head's pooling option does not apply).

Imports: torchvision at the top (already loaded by ``deepmetric.data``); timm is imported
inside ``TimmBackbone`` because importing it costs 0.5-0.8 s more (measured on top of torch and
torchvision) and most runs use another backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet50

__all__ = ["MobileNetV2Backbone", "ResNet50Backbone", "TimmBackbone"]


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
        import timm  # deferred: see the module header

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
