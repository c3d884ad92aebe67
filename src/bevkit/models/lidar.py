"""LiDAR to BEV: PointPillars (hard voxelisation into pillars, a pillar feature net, scatter)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevkit.models.config import GridConfig
from bevkit.ops import pillar_scatter, voxelize_batch


class PointPillars(nn.Module):
    """PointPillars' encoder with the pillars on the BEV grid's cells (one pillar per (iy, ix)).

    Each point is decorated with its offset to the pillar's point mean (3) and to the pillar
    centre (x, y), a linear layer + BN + ReLU runs per point, and a max over the pillar's points
    gives its feature, which ``ops.pillar_scatter`` writes to the BEV canvas.
    """

    def __init__(self, grid: GridConfig, channels: int, point_features: int, max_points: int, max_voxels: int):
        super().__init__()
        g = grid.bev_grid()
        self.grid = grid
        self.voxel_size = (g.dx, g.dy, g.zmax - g.zmin)
        self.point_range = (g.xmin, g.ymin, g.zmin, g.xmax, g.ymax, g.zmax)
        self.point_features = point_features
        self.max_points = max_points
        self.max_voxels = max_voxels
        self.channels = channels
        self.linear = nn.Linear(point_features + 5, channels, bias=False)
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, points: list[Tensor]) -> Tensor:
        """Frames: points in the ego frame, (x, y, z, features...); the output on the ego grid.

        Shapes:
            points: B tensors (P_b, F)   returns: (B, C, Y, X)
        """
        pts = [p[:, : self.point_features].float() for p in points]
        vox = voxelize_batch(pts, self.voxel_size, self.point_range, self.max_points, self.max_voxels)
        feats, coords, num = vox.features, vox.coords, vox.num_points  # (V, M, F), (V, 4), (V,)
        m = feats.shape[1]
        mask = (torch.arange(m, device=feats.device).view(1, m) < num.view(-1, 1)).unsqueeze(-1)  # (V, M, 1)
        mean = (feats[..., :3] * mask).sum(1, keepdim=True) / num.clamp(min=1).view(-1, 1, 1)  # (V, 1, 3)
        xmin, ymin = self.point_range[0], self.point_range[1]
        cx = xmin + (coords[:, 3].to(feats.dtype) + 0.5) * self.voxel_size[0]
        cy = ymin + (coords[:, 2].to(feats.dtype) + 0.5) * self.voxel_size[1]
        centre = torch.stack([cx, cy], dim=-1).unsqueeze(1)  # (V, 1, 2)
        x = torch.cat([feats, feats[..., :3] - mean, feats[..., :2] - centre], dim=-1) * mask  # (V, M, F + 5)
        x = self.linear(x)  # (V, M, C)
        x = torch.relu(self.norm(x.transpose(1, 2)).transpose(1, 2))
        x = x.masked_fill(~mask, float("-inf")).amax(dim=1)  # (V, C)
        x = torch.nan_to_num(x, neginf=0.0)  # a pillar always holds a point; guard anyway
        return pillar_scatter(x, coords, len(points), self.grid.shape).contiguous()
