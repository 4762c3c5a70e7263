"""Conv-4: the small four-block CNN of the few-shot literature (Vinyals et al. 2016, Snell et al.
2017), for small arrays such as 28 x 28 digits or Omniglot characters."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """Four blocks of conv3x3 (padding 1) - BatchNorm - ReLU - maxpool 2x2.

    Each block halves the spatial size (floor): 28 -> 14 -> 7 -> 3 -> 1, 84 -> 42 -> 21 -> 10 -> 5.

    Args:
        in_chans: input channels (1 for grayscale, 3 for colour).
        hidden: channels of every block (64 in the literature); also ``feature_dim``.

    Input (B, in_chans, H, W) with H, W >= 16; output (B, hidden, H // 16, W // 16).
    """

    output = "map"  # forward returns a (B, C, H, W) map

    def __init__(self, in_chans: int = 3, hidden: int = 64) -> None:
        super().__init__()
        self.feature_dim = hidden
        blocks = []
        channels = in_chans
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = hidden
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, hidden, H // 16, W // 16)."""
        return self.blocks(x)
