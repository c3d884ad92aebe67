"""Camera-LiDAR fusion on the BEV grid."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevkit.models.necks import conv_bn_relu


class ConvFuser(nn.Module):
    """BEVFusion's fuser: concatenate camera and LiDAR BEV maps, one 3x3 conv + BN + ReLU."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.conv = conv_bn_relu(sum(in_channels), channels)
        self.channels = channels

    def forward(self, bevs: list[Tensor]) -> Tensor:
        """Shapes:
            bevs: [(B, C_i, Y, X)] (same grid)   returns: (B, channels, Y, X)
        """
        return self.conv(torch.cat(bevs, dim=1))
