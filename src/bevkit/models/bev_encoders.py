"""BEV encoders: a ResNet-style BEV backbone with BEVDet's LSS-FPN neck back to grid resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.necks import conv_bn_relu


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        """Shapes:
            x: (B, C_in, Y, X)   returns: (B, C_out, Y / stride, X / stride)
        """
        return F.relu(self.conv2(self.conv1(x)) + self.short(x))


class ResNetBEV(nn.Module):
    """BEVDet's ``ResNetForBEVDet`` + ``FPN_LSS``: stride-2 stages of basic blocks, then the last
    stage upsampled 4x onto the first, concatenated, convolved and upsampled 2x back to the grid.
    Three stages (strides 2, 4, 8); the upsampling goes to the first stage's and the input's exact
    sizes, so any Y and X work (multiples of 8 keep the cells aligned across stages)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], blocks: tuple[int, ...], out_channels: int):
        super().__init__()
        if len(channels) != 3 or len(blocks) != 3:
            raise ValueError("ResNetBEV: three stages (channels and blocks of length 3)")
        stages, cin = [], in_channels
        for c, nb in zip(channels, blocks):
            stages.append(nn.Sequential(BasicBlock(cin, c, 2), *[BasicBlock(c, c) for _ in range(nb - 1)]))
            cin = c
        self.stages = nn.ModuleList(stages)
        mid = out_channels * 2
        self.fuse = nn.Sequential(conv_bn_relu(channels[0] + channels[-1], mid), conv_bn_relu(mid, mid))
        self.out = nn.Sequential(conv_bn_relu(mid, out_channels), nn.Conv2d(out_channels, out_channels, 1))
        self.out_channels = out_channels

    def forward(self, bev: Tensor) -> Tensor:
        """Shapes:
            bev: (B, C_in, Y, X)   returns: (B, out_channels, Y, X)
        """
        feats, x = [], bev
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # (B, C_i, Y / 2^(i+1), X / 2^(i+1))
        x = F.interpolate(feats[-1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([feats[0], x], dim=1))  # (B, mid, Y / 2, X / 2)
        x = F.interpolate(x, size=bev.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(x)


class NoBEVEncoder(nn.Module):
    """No BEV encoder (``bev_encoder.type: none``): the heads read the fused BEV itself, as BEVFormer's
    detection head reads its encoder's BEV directly. ``out_channels`` is the input's."""

    def __init__(self, in_channels: int, *_):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, bev: Tensor) -> Tensor:
        """Shapes:
            bev: (B, C, Y, X)   returns: the same tensor
        """
        return bev
