"""Image necks: multi-scale backbone features to one map at the finest selected stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FPN(nn.Module):
    """Top-down FPN (lateral 1x1, nearest upsampling and sum, 3x3 output conv); returns only the
    finest level, as BEVDet's ``CustomFPN(out_ids=[0])`` does."""

    def __init__(self, in_channels: list[int], in_strides: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.out = nn.Conv2d(channels, channels, 3, padding=1)
        self.channels = channels
        self.stride = in_strides[0]

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Shapes:
            feats: [(B, C_i, H_i, W_i)], finest first   returns: (B, channels, H_0, W_0)
        """
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            x = lat(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        return self.out(x)


class LSSFPN(nn.Module):
    """BEVDet's ``FPN_LSS``: upsample the coarsest level to the finest, concatenate, two 3x3 convs."""

    def __init__(self, in_channels: list[int], in_strides: list[int], channels: int):
        super().__init__()
        self.fuse = nn.Sequential(conv_bn_relu(in_channels[0] + in_channels[-1], channels),
                                  conv_bn_relu(channels, channels))
        self.channels = channels
        self.stride = in_strides[0]

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Shapes:
            feats: [(B, C_i, H_i, W_i)], finest first   returns: (B, channels, H_0, W_0)
        """
        up = F.interpolate(feats[-1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([feats[0], up], dim=1))


class GeneralizedLSSFPN(nn.Module):
    """BEVFusion's ``GeneralizedLSSFPN``: from the coarsest level down, each level is concatenated
    with the bilinearly upsampled level above it, then a 1x1 and a 3x3 conv (BN, ReLU) give
    ``channels``; the finest level is returned (the one BEVFusion's view transform reads)."""

    def __init__(self, in_channels: list[int], in_strides: list[int], channels: int):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError("generalized_lss needs at least two backbone levels")
        n = len(in_channels)
        self.lateral = nn.ModuleList(
            conv_bn_relu(in_channels[i] + (in_channels[i + 1] if i == n - 2 else channels), channels, 1)
            for i in range(n - 1))
        self.out = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(n - 1))
        self.channels = channels
        self.stride = in_strides[0]

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Shapes:
            feats: [(B, C_i, H_i, W_i)], finest first   returns: (B, channels, H_0, W_0)
        """
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            up = F.interpolate(x, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.out[i](self.lateral[i](torch.cat([feats[i], up], dim=1)))
        return x
