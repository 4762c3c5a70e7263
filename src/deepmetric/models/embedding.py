"""The embedding model: backbone + embedding head, and ``build_model``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from .backbones import build_backbone
from .head import EmbeddingHead, canonical_pooling

__all__ = ["BATCH_NORMS", "EmbeddingModel", "build_model"]

#: The BatchNorm layer types ``freeze_bn`` keeps in eval mode (SyncBatchNorm: after
#: ``train.sync_bn`` converted them).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class EmbeddingModel(nn.Module):
    """images (B, C, H, W) -> embeddings (B, embedding_dim), L2-normalised by default.

    Attributes:
        backbone: returns a (B, feature_dim, H', W') map, or (B, feature_dim) for backbones
            that pool themselves (``backbone.output == "pooled"``, e.g. timm ViTs).
        head: :class:`EmbeddingHead` (pooling, linear, optional norm, L2 normalisation).
        feature_dim: channels of the backbone output.
        embedding_dim: size of the embeddings.
        backbone_name: the name given to :func:`build_model` (None if built by hand).
        freeze_bn: when True, every BatchNorm layer of the backbone stays in eval mode (its
            running statistics are frozen) after each ``train()`` call; its affine weight and
            bias are still trained. BatchNorm in the head is not affected.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: EmbeddingHead,
        freeze_bn: bool = False,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone_name
        self.backbone = backbone
        self.head = head
        self.feature_dim = int(backbone.feature_dim)
        self.embedding_dim = head.fc.out_features
        self.freeze_bn = freeze_bn
        self.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embedding_dim)."""
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> EmbeddingModel:
        """Set train/eval mode; with ``freeze_bn`` the backbone's BatchNorms stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, BATCH_NORMS):
                    module.eval()
        return self

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone (for their own learning rate / weight decay group)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the embedding head (usually a larger learning rate)."""
        return self.head.parameters()


def build_model(
    backbone: str,
    embedding_dim: int = 512,
    pooling: str = "avg",
    pretrained: str | os.PathLike | bool | None = None,
    freeze_bn: bool = False,
    norm_layer: str | bool | None = None,
    l2_normalize: bool = True,
    in_chans: int = 3,
) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel`.

    Args:
        backbone: "bninception", "resnet50" (torchvision), "mobilenet_v2" (torchvision),
            "conv4", any timm model name, or "timm:<name>".
        embedding_dim: embedding size d (512).
        pooling: "avg", "max" or "avgmax" (sum of the two) over the backbone's map. Backbones
            that pool themselves (timm ViTs) accept only "avg" (their own pooling is used).
        pretrained: None (random init), a local weight file, or "package" (installed weight
            package: mobilenet_v2, tf_efficientnet_lite0). Nothing is ever downloaded;
            True / "imagenet" raise a ValueError that names the file to provide.
        freeze_bn: keep the backbone's BatchNorm running statistics frozen (affine trained).
        norm_layer: None, "batchnorm" or "layernorm" after the linear layer.
        l2_normalize: L2-normalise the embeddings (default True).
        in_chans: input channels (conv4 and timm models only; 1 for grayscale).

    Input conventions: see :func:`preset_for` (BN-Inception wants BGR 0-255 minus the mean).
    """
    pooling = canonical_pooling(pooling)
    net = build_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
    if getattr(net, "output", "map") == "pooled" and pooling != "avg":
        raise ValueError(
            f"backbone {backbone!r} returns tokens, pooled by timm's own forward_head (class "
            f"token or average); pooling={pooling!r} cannot be applied. Use pooling='avg'."
        )
    head = EmbeddingHead(
        net.feature_dim,
        embedding_dim=embedding_dim,
        pooling=pooling,
        norm_layer=norm_layer,
        l2_normalize=l2_normalize,
    )
    return EmbeddingModel(net, head, freeze_bn=freeze_bn, backbone_name=backbone)
