"""Embedding models: backbones (BN-Inception, torchvision ResNet-50 / MobileNetV2, timm, Conv-4),
the embedding head, and :func:`build_model`.

Every backbone family is one record of ``BACKBONE_FAMILIES`` (constructor, weight source,
input preprocessing); see :mod:`deepmetric.models.backbones`. Nothing is downloaded: pretrained
weights come from a local file or an installed weight package (``pretrained="package"``); see
:mod:`deepmetric.models.weights`.
"""

from .backbones import (
    BACKBONE_FAMILIES,
    BUILTIN_BACKBONES,
    PREPROCESSING,
    WEIGHT_PACKAGES,
    BackboneFamily,
    Preprocessing,
    build_backbone,
    find_family,
    package_weights_path,
    preset_for,
)
from .bninception import BNINCEPTION_FILE, BNInception
from .conv4 import Conv4
from .embedding import EmbeddingModel, build_model
from .head import NORM_LAYERS, POOLINGS, EmbeddingHead, global_pool
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
    "BNINCEPTION_FILE",
    "BUILTIN_BACKBONES",
    "NORM_LAYERS",
    "POOLINGS",
    "PREPROCESSING",
    "WEIGHT_PACKAGES",
    "BNInception",
    "BackboneFamily",
    "Conv4",
    "EmbeddingHead",
    "EmbeddingModel",
    "MobileNetV2Backbone",
    "Preprocessing",
    "ResNet50Backbone",
    "TimmBackbone",
    "WeightPackage",
    "build_backbone",
    "build_model",
    "efficientnet_lite_to_timm",
    "find_family",
    "global_pool",
    "load_state_dict_file",
    "load_weights",
    "package_weights_path",
    "preset_for",
    "resolve_pretrained",
]
