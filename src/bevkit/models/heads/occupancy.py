"""Occ3D occupancy by channel-to-height (FlashOcc / BEVDet-Occ): BEV channels reshaped into Z slices.

Occ3D stores labels as (X, Y, Z) (x forward index first); this head predicts voxels in the
project's (B, C, Z, Y, X) layout and converts at the boundary (:func:`occ3d_to_voxels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.models.config import OccupancyHeadConfig
from bevkit.models.necks import conv_bn_relu


def occ3d_to_voxels(occ: Tensor) -> Tensor:
    """Occ3D layout to voxel layout.

    Shapes:
        occ: (B, X, Y, Z)   returns: (B, Z, Y, X)
    """
    return occ.permute(0, 3, 2, 1)


class OccupancyHead(nn.Module):
    """A 3x3 conv, then a 1x1 conv to ``nz * num_classes`` channels viewed as (classes, Z)."""

    def __init__(self, in_channels: int, cfg: OccupancyHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = conv_bn_relu(in_channels, cfg.channels)
        self.out = nn.Conv2d(cfg.channels, cfg.num_classes * cfg.nz, 1)

    def forward(self, bev: Tensor) -> Tensor:
        """Frames: ego grid (X along ego forward), Z up from the occupancy grid's zmin.

        Shapes:
            bev: (B, C, Y, X)   returns: logits (B, num_classes, Z, Y, X)
        """
        b, _, ny, nx = bev.shape
        x = self.out(self.conv(bev))  # (B, classes * Z, Y, X)
        return x.view(b, self.cfg.num_classes, self.cfg.nz, ny, nx)

    def loss(self, logits: Tensor, occupancy: Tensor, mask_camera: Tensor | None = None) -> dict[str, Tensor]:
        """Cross-entropy over voxels the cameras see (``mask_camera``, as Occ3D's camera-only
        protocol), averaged over them.

        The labels may be an integer multiple finer than the prediction along each axis (e.g. Occ3D's
        200 x 200 x 16 against a 50 x 50 x 4 prediction): each predicted voxel is then supervised by
        the label voxel at its centre (nearest sampling; for an even factor, the one just above the
        centre).

        Shapes:
            logits: (B, K, Z, Y, X)   occupancy, mask_camera: (B, f X, f Y, f Z) Occ3D layout, f >= 1
            returns: {"occ_ce": ()}
        """
        target = self._at_prediction(occ3d_to_voxels(occupancy), logits).long()  # (B, Z, Y, X)
        ce = F.cross_entropy(logits, target, reduction="none")  # (B, Z, Y, X)
        if mask_camera is None:
            return {"occ_ce": ce.mean()}
        w = self._at_prediction(occ3d_to_voxels(mask_camera), logits).to(ce.dtype)
        return {"occ_ce": (ce * w).sum() / w.sum().clamp(min=1)}

    @staticmethod
    def _at_prediction(voxels: Tensor, logits: Tensor) -> Tensor:
        """Centre-voxel subsampling of (B, Z', Y', X') labels to the prediction's (Z, Y, X)."""
        fine, coarse = voxels.shape[1:], logits.shape[2:]
        if voxels.shape[0] != logits.shape[0] or any(f % c for f, c in zip(fine, coarse)):
            raise ValueError(f"occupancy labels (B, Z, Y, X) = {tuple(voxels.shape)} are not an integer multiple "
                             f"of the prediction {tuple(logits.shape[:1] + logits.shape[2:])}")
        steps = [f // c for f, c in zip(fine, coarse)]
        return voxels[:, steps[0] // 2:: steps[0], steps[1] // 2:: steps[1], steps[2] // 2:: steps[2]]

    @torch.no_grad()
    def decode(self, logits: Tensor, factor: tuple[int, int, int] = (1, 1, 1)) -> Tensor:
        """Most likely class per voxel, in the Occ3D layout, each voxel repeated ``factor`` times
        along (x, y, z) to reach a finer label grid.

        Shapes:
            logits: (B, K, Z, Y, X)   returns: (B, fx X, fy Y, fz Z) uint8
        """
        occ = logits.argmax(dim=1).permute(0, 3, 2, 1).to(torch.uint8)  # (B, X, Y, Z)
        for dim, f in zip((1, 2, 3), factor):
            if f > 1:
                occ = occ.repeat_interleave(f, dim=dim)
        return occ

    def decode_to(self, logits: Tensor, labels_shape) -> Tensor:
        """:meth:`decode` on the label grid ``labels_shape`` (X, Y, Z), a whole multiple of the head's
        along each axis (a ``ValueError`` otherwise).

        Shapes:
            logits: (B, K, Z, Y, X)   returns: (B, X', Y', Z') uint8 with (X', Y', Z') = labels_shape
        """
        head = (logits.shape[-1], logits.shape[-2], logits.shape[-3])  # (X, Y, Z)
        labels = tuple(int(n) for n in labels_shape)
        if any(t % m for t, m in zip(labels, head)):
            raise ValueError(f"occupancy labels (X, Y, Z) = {labels} are not an integer multiple of the "
                             f"prediction's {head}")
        return self.decode(logits, tuple(t // m for t, m in zip(labels, head)))
