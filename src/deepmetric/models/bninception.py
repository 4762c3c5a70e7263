"""BN-Inception (Inception v2 with batch normalisation, Ioffe & Szegedy 2015).

The parameter names and shapes are those of the widely used Caffe weights converted to PyTorch
(``bninception`` of the ``pretrainedmodels`` package, file ``bn_inception-52deb4733.pth``), so
that file loads directly. The network is written from a table of inception blocks instead of
~300 hand-written lines; every convolution is registered directly on the model under its Caffe
name (``inception_3a_1x1``, followed by its BatchNorm ``inception_3a_1x1_bn``), which is what
keeps the state-dict keys identical.

Input convention of the Caffe weights: **BGR** channel order, range **0-255**, mean
``[104, 117, 128]`` subtracted, no division by a std. The ``bninception`` transform preset of
:mod:`deepmetric.data` produces exactly this; feeding RGB 0-1 images gives poor features.
A 224 or 227 input gives a (B, 1024, 7, 7) feature map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BNINCEPTION_FILE", "BNINCEPTION_URL", "BNInception"]

#: Name and (original) address of the converted Caffe weights. deepmetric never downloads it:
#: the user puts the file on disk and passes its path.
BNINCEPTION_FILE = "bn_inception-52deb4733.pth"
BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"


@dataclass(frozen=True)
class _Block:
    """One inception block.

    ``n1x1`` = 0 means no 1x1 branch (the two stride-2 "reduction" blocks 3c and 4e).
    ``reduce3``/``out3``: 1x1 reduction then 3x3 conv. ``reduce_d``/``out_d1``/``out_d2``:
    1x1 reduction then two 3x3 convs. ``pool``: "avg" (3x3, stride 1) or "max".
    ``pool_proj`` = 0 means the pooled input is concatenated as is (reduction blocks).
    ``stride``: 2 for reduction blocks (3x3 conv, second double-3x3 conv and pool).
    """

    name: str
    in_channels: int
    n1x1: int
    reduce3: int
    out3: int
    reduce_d: int
    out_d1: int
    out_d2: int
    pool: str
    pool_proj: int
    stride: int = 1

    @property
    def out_channels(self) -> int:
        pooled = self.pool_proj if self.pool_proj else self.in_channels
        return self.n1x1 + self.out3 + self.out_d2 + pooled


_BLOCKS = (
    _Block("inception_3a", 192, 64, 64, 64, 64, 96, 96, "avg", 32),
    _Block("inception_3b", 256, 64, 64, 96, 64, 96, 96, "avg", 64),
    _Block("inception_3c", 320, 0, 128, 160, 64, 96, 96, "max", 0, stride=2),
    _Block("inception_4a", 576, 224, 64, 96, 96, 128, 128, "avg", 128),
    _Block("inception_4b", 576, 192, 96, 128, 96, 128, 128, "avg", 128),
    _Block("inception_4c", 576, 160, 128, 160, 128, 160, 160, "avg", 128),
    _Block("inception_4d", 608, 96, 128, 192, 160, 192, 192, "avg", 128),
    _Block("inception_4e", 608, 0, 128, 192, 192, 256, 256, "max", 0, stride=2),
    _Block("inception_5a", 1056, 352, 192, 320, 160, 224, 224, "avg", 128),
    # 5b uses a stride-1 max pool (a quirk of the original Caffe model).
    _Block("inception_5b", 1024, 352, 192, 320, 192, 224, 224, "max", 128),
)


class BNInception(nn.Module):
    """BN-Inception with the key names of the converted Caffe weights.

    Args:
        num_classes: 0 (default) builds the feature extractor only: ``forward`` returns the
            (B, 1024, H/32, W/32) map. A positive value adds ``global_pool`` (7x7 average) and
            ``last_linear`` (1024 -> num_classes) like ``pretrainedmodels``; ``forward`` then
            returns logits (B, num_classes) and needs a 224/227 input.

    Input: (B, 3, H, W) BGR images in 0-255 minus the mean ``[104, 117, 128]``.
    """

    feature_dim = 1024
    output = "map"  # forward returns a (B, C, H, W) map (when num_classes == 0)

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        # Stem.
        self._add_conv_bn("conv1_7x7_s2", 3, 64, kernel=7, stride=2)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self._add_conv_bn("conv2_3x3_reduce", 64, 64, kernel=1)
        self._add_conv_bn("conv2_3x3", 64, 192, kernel=3)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        # Inception blocks, registered in the same order as the original.
        for block in _BLOCKS:
            self._add_block(block)
        if num_classes > 0:
            self.global_pool = nn.AvgPool2d(7, stride=1, ceil_mode=True)
            self.last_linear = nn.Linear(1024, num_classes)

    # ----------------------------------------------------------------------------- building
    def _add_conv_bn(
        self, name: str, in_channels: int, out_channels: int, kernel: int, stride: int = 1
    ) -> None:
        """Register ``name`` (Conv2d with bias, "same" padding) and ``name_bn`` (BatchNorm2d)."""
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        self.add_module(name, conv)
        self.add_module(f"{name}_bn", nn.BatchNorm2d(out_channels))

    def _add_block(self, b: _Block) -> None:
        p = b.name
        if b.n1x1:
            self._add_conv_bn(f"{p}_1x1", b.in_channels, b.n1x1, kernel=1)
        self._add_conv_bn(f"{p}_3x3_reduce", b.in_channels, b.reduce3, kernel=1)
        self._add_conv_bn(f"{p}_3x3", b.reduce3, b.out3, kernel=3, stride=b.stride)
        self._add_conv_bn(f"{p}_double_3x3_reduce", b.in_channels, b.reduce_d, kernel=1)
        self._add_conv_bn(f"{p}_double_3x3_1", b.reduce_d, b.out_d1, kernel=3)
        self._add_conv_bn(f"{p}_double_3x3_2", b.out_d1, b.out_d2, kernel=3, stride=b.stride)
        if b.pool == "avg":
            pool: nn.Module = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True)
        elif b.stride == 2:
            pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        else:
            pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        self.add_module(f"{p}_pool", pool)
        if b.pool_proj:
            self._add_conv_bn(f"{p}_pool_proj", b.in_channels, b.pool_proj, kernel=1)

    # ------------------------------------------------------------------------------ forward
    def _conv_bn_relu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, name)(x)
        x = getattr(self, f"{name}_bn")(x)
        return F.relu(x, inplace=True)

    def _block(self, b: _Block, x: torch.Tensor) -> torch.Tensor:
        p = b.name
        branches = []
        if b.n1x1:
            branches.append(self._conv_bn_relu(f"{p}_1x1", x))
        y = self._conv_bn_relu(f"{p}_3x3_reduce", x)
        branches.append(self._conv_bn_relu(f"{p}_3x3", y))
        y = self._conv_bn_relu(f"{p}_double_3x3_reduce", x)
        y = self._conv_bn_relu(f"{p}_double_3x3_1", y)
        branches.append(self._conv_bn_relu(f"{p}_double_3x3_2", y))
        y = getattr(self, f"{p}_pool")(x)
        if b.pool_proj:
            y = self._conv_bn_relu(f"{p}_pool_proj", y)
        branches.append(y)
        return torch.cat(branches, dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) mean-subtracted BGR 0-255 -> (B, 1024, H', W') (7x7 for 224/227)."""
        x = self.pool1_3x3_s2(self._conv_bn_relu("conv1_7x7_s2", x))
        x = self._conv_bn_relu("conv2_3x3_reduce", x)
        x = self.pool2_3x3_s2(self._conv_bn_relu("conv2_3x3", x))
        for block in _BLOCKS:
            x = self._block(block, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, 1024, H', W'), or logits (B, num_classes) if ``num_classes > 0``."""
        x = self.features(x)
        if self.num_classes > 0:
            x = self.last_linear(torch.flatten(self.global_pool(x), 1))
        return x
