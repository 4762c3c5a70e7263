"""Embedding head: global pooling, linear projection, optional normalisation, L2 norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORM_LAYERS", "POOLINGS", "EmbeddingHead", "global_pool"]

#: Accepted ``pooling`` values. "avgmax" is the *sum* of average and max pooling.
POOLINGS = ("avg", "max", "avgmax")
_POOLING_ALIASES = {"mean": "avg", "average": "avg", "avg+max": "avgmax", "maxavg": "avgmax"}
#: Accepted ``norm_layer`` values (None / False / "none" = no normalisation layer).
NORM_LAYERS = ("batchnorm", "layernorm")
_NORM_ALIASES = {"bn": "batchnorm", "batchnorm1d": "batchnorm", "ln": "layernorm"}


def canonical_pooling(pooling: str) -> str:
    """Return the canonical name of a pooling option or raise a ValueError listing them."""
    name = _POOLING_ALIASES.get(str(pooling).lower(), str(pooling).lower())
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    return name


def canonical_norm_layer(norm_layer: str | bool | None) -> str | None:
    """Return "batchnorm", "layernorm" or None; raise a ValueError on anything else."""
    if norm_layer is None or norm_layer is False:
        return None
    name = str(norm_layer).lower()
    name = _NORM_ALIASES.get(name, name)
    if name == "none":
        return None
    if name not in NORM_LAYERS:
        raise ValueError(
            f"unknown norm_layer {norm_layer!r}; choose None or one of {', '.join(NORM_LAYERS)}"
        )
    return name


def global_pool(features: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """Pool a feature map over its spatial positions.

    Args:
        features: (B, C, H, W) map.
        pooling: "avg", "max" or "avgmax" (avg + max, summed).

    Returns:
        (B, C).
    """
    pooling = canonical_pooling(pooling)
    if features.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(features.shape)}")
    if pooling == "avg":
        return features.mean(dim=(2, 3))
    if pooling == "max":
        return features.amax(dim=(2, 3))
    return features.mean(dim=(2, 3)) + features.amax(dim=(2, 3))


class EmbeddingHead(nn.Module):
    """Backbone output -> embedding.

    pooling (for a (B, C, H, W) map) -> Linear(C, embedding_dim) -> optional BatchNorm1d or
    LayerNorm -> optional L2 normalisation. A (B, C) input (a backbone that pools itself, such
    as a ViT through timm's ``forward_head``) skips the pooling step.

    The linear weight is Kaiming-normal (fan_out), the bias zero.

    Args:
        in_features: C, the backbone's channels.
        embedding_dim: output size d.
        pooling: "avg", "max" or "avgmax" (sum of both).
        norm_layer: None, "batchnorm" or "layernorm", applied to the d-dim projection.
        l2_normalize: divide each embedding by its L2 norm (on by default).
    """

    def __init__(
        self,
        in_features: int,
        embedding_dim: int = 512,
        pooling: str = "avg",
        norm_layer: str | bool | None = None,
        l2_normalize: bool = True,
    ) -> None:
        super().__init__()
        self.pooling = canonical_pooling(pooling)
        self.l2_normalize = l2_normalize
        self.fc = nn.Linear(in_features, embedding_dim)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out")
        nn.init.zeros_(self.fc.bias)
        norm = canonical_norm_layer(norm_layer)
        if norm == "batchnorm":
            self.norm: nn.Module = nn.BatchNorm1d(embedding_dim)
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(embedding_dim)
        else:
            self.norm = nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) map or (B, C) pooled features -> (B, embedding_dim)."""
        if features.dim() == 4:
            features = global_pool(features, self.pooling)
        elif features.dim() != 2:
            raise ValueError(
                f"expected (B, C, H, W) or (B, C) features, got shape {tuple(features.shape)}"
            )
        x = self.norm(self.fc(features))
        if self.l2_normalize:
            x = F.normalize(x, p=2, dim=1)
        return x
