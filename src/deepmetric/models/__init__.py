"""Embedding models: backbones (BN-Inception, torchvision ResNet-50 / MobileNetV2, timm, Conv-4),
the embedding head, and :func:`build_model`.

Nothing is downloaded: pretrained weights come from a local file or an installed weight package
(``pretrained="package"``); see :mod:`deepmetric.models.backbones`.
"""

from .backbones import (
    BUILTIN_BACKBONES,
    WEIGHT_PACKAGES,
    MobileNetV2Backbone,
    ResNet50Backbone,
    TimmBackbone,
    build_backbone,
    efficientnet_lite_to_timm,
    load_state_dict_file,
    load_weights,
    package_weights_path,
)
from .bninception import BNINCEPTION_FILE, BNInception
from .conv4 import Conv4
from .embedding import EmbeddingModel, build_model, preset_for
from .head import NORM_LAYERS, POOLINGS, EmbeddingHead, global_pool

__all__ = [
    "BNINCEPTION_FILE",
    "BUILTIN_BACKBONES",
    "NORM_LAYERS",
    "POOLINGS",
    "WEIGHT_PACKAGES",
    "BNInception",
    "Conv4",
    "EmbeddingHead",
    "EmbeddingModel",
    "MobileNetV2Backbone",
    "ResNet50Backbone",
    "TimmBackbone",
    "build_backbone",
    "build_model",
    "efficientnet_lite_to_timm",
    "global_pool",
    "load_state_dict_file",
    "load_weights",
    "package_weights_path",
    "preset_for",
]
