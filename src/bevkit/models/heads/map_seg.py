"""HD-map segmentation on the BEV grid: divider, ped_crossing, boundary, drivable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.config import MapHeadConfig
from bevkit.models.necks import conv_bn_relu


class MapSegHead(nn.Module):
    """Per-class logits (independent sigmoids: classes overlap, e.g. a divider on drivable area),
    optionally upsampled ``upsample`` times onto a finer map grid with the same extent."""

    def __init__(self, in_channels: int, cfg: MapHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = conv_bn_relu(in_channels, cfg.channels)
        self.refine = conv_bn_relu(cfg.channels, cfg.channels) if cfg.upsample > 1 else nn.Identity()
        self.out = nn.Conv2d(cfg.channels, len(cfg.classes), 1)

    def forward(self, bev: Tensor) -> Tensor:
        """Frames: ego grid, X along ego forward.

        Shapes:
            bev: (B, C, Y, X)   returns: logits (B, K, Y * upsample, X * upsample)
        """
        x = self.conv(bev)
        if self.cfg.upsample > 1:
            x = self.refine(F.interpolate(x, scale_factor=self.cfg.upsample, mode="bilinear", align_corners=False))
        return self.out(x)

    def loss(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Binary cross-entropy (mean over cells) + soft Dice per class (weight ``dice_weight``).

        Shapes:
            logits: (B, K, Y, X)   target: (B, K, Y, X) {0, 1}   returns: {"map_bce": (), "map_dice": ()}
        """
        if logits.shape != target.shape:
            raise ValueError(f"map target {tuple(target.shape)} does not match prediction {tuple(logits.shape)}")
        t = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, t)
        p = logits.sigmoid()
        inter = (p * t).sum(dim=(0, 2, 3))
        dice = 1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3)) + 1)  # (K,)
        return {"map_bce": bce, "map_dice": self.cfg.dice_weight * dice.mean()}

    @torch.no_grad()
    def decode(self, logits: Tensor) -> Tensor:
        """Shapes:
            logits: (B, K, Y, X)   returns: (B, K, Y, X) bool
        """
        return logits.sigmoid() > self.cfg.threshold
