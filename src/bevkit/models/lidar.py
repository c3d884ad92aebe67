"""LiDAR to BEV: PointPillars (pillars, a pillar feature net, scatter) and a sparse-voxel 3D encoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bevkit.models.config import GridConfig
from bevkit.ops import (
    SparseVoxels,
    conv_output_shape,
    pillar_scatter,
    sparse_conv3d,
    voxelize_batch,
)


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
        return self.encode_pillars(*self.pillars(points), len(points))

    def pillars(self, points: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Voxelise the points into pillars (data-dependent sizes: outside an exported graph).

        Shapes:
            points: B tensors (P_b, F)   returns: features (V, M, F'), coords (V, 4) (b, iz, iy, ix),
            points per pillar (V,)
        """
        pts = [p[:, : self.point_features].float() for p in points]
        vox = voxelize_batch(pts, self.voxel_size, self.point_range, self.max_points, self.max_voxels)
        return vox.features, vox.coords, vox.num_points

    def encode_pillars(self, feats: Tensor, coords: Tensor, num: Tensor, batch_size: int) -> Tensor:
        """The pillar feature net and the scatter to the BEV canvas (what an exported graph runs).

        Shapes:
            feats: (V, M, F')   coords: (V, 4)   num: (V,)   returns: (B, C, Y, X)
        """
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
        return pillar_scatter(x, coords, batch_size, self.grid.shape).contiguous()


class SparseConv(nn.Module):
    """A sparse 3D convolution (``ops.sparse_conv3d``) + BatchNorm1d + ReLU on a voxel set.

    ``subm``: submanifold (same voxels out); else strided, writing every reached voxel. BN as
    mmdetection3d's sparse encoders configure it (eps 1e-3, momentum 0.01).
    """

    def __init__(self, cin: int, cout: int, kernel=3, stride=1, padding=0, subm: bool = True, relu: bool = True):
        super().__init__()
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.weight = nn.Parameter(torch.empty(*k, cin, cout))
        bound = 1.0 / math.sqrt(cin * k[0] * k[1] * k[2])  # conv3d's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        self.norm = nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01)
        self.stride, self.padding, self.subm, self.relu = stride, padding, subm, relu

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        """Shapes: x.features (M, C_in) -> (M', C_out)."""
        y = sparse_conv3d(x, self.weight, None, self.stride, self.padding, subm=self.subm)
        f = self.norm(y.features)
        return y.replace(torch.relu(f) if self.relu else f)


class SparseBasicBlock(nn.Module):
    """Two submanifold 3x3x3 convolutions with a residual connection (SECOND / CenterPoint)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = SparseConv(channels, channels)
        self.conv2 = SparseConv(channels, channels, relu=False)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        """Shapes: x.features (M, C) -> (M, C), same voxels."""
        y = self.conv2(self.conv1(x))
        return y.replace(torch.relu(y.features + x.features))


class SparseVoxelEncoder(nn.Module):
    """BEVFusion's / CenterPoint-Voxel's LiDAR branch: hard voxels averaged (``HardSimpleVFE``),
    a sparse 3D ResNet (mmdetection3d's ``SparseEncoder`` with basic blocks), z folded into channels.

    Stages (base width c): a submanifold stem to c; then [2 basic blocks + a stride-2 conv] at c,
    2c and 4c (the third without padding along z); 2 basic blocks at 8c; an output conv of kernel
    (3, 1, 1) and stride (2, 1, 1) along z to ``channels / Z_out`` channels. The voxels are 1/8 of a
    BEV cell in x and y, so the three stride-2 stages land on the BEV grid; along z the grid has
    one spare cell, as SECOND's sparse shape does (41 for 40 cells), and z shrinks 41 -> 21 -> 11
    -> 5 -> 2. Output cell j reads the input voxels around 8j, so its receptive field is centred
    3.5 voxels before the cell centre, as in the original networks; the heads learn the offset.
    """

    def __init__(self, grid: GridConfig, channels: int, point_features: int, max_points: int, max_voxels: int,
                 voxel_size: tuple[float, float, float], base_channels: int = 16,
                 zbound: tuple[float, float] | None = None):
        super().__init__()
        g = grid.bev_grid()
        vx, vy, vz = (float(v) for v in voxel_size)
        if abs(8 * vx - g.dx) > 1e-6 or abs(8 * vy - g.dy) > 1e-6:
            raise ValueError(f"lidar.voxel_size x/y must be 1/8 of the BEV cell ({g.dx}, {g.dy}); got ({vx}, {vy})")
        z0, z1 = zbound if zbound is not None else (g.zmin, g.zmax)
        nz = (z1 - z0) / vz
        if abs(nz - round(nz)) > 1e-6 or round(nz) < 1:
            raise ValueError(f"lidar z range {z1 - z0} m is not a whole number of {vz} m voxels")
        ny, nx = grid.shape
        self.grid = grid
        self.voxel_size = (vx, vy, vz)
        self.point_range = (g.xmin, g.ymin, float(z0), g.xmax, g.ymax, float(z1))
        self.sparse_shape = (int(round(nz)) + 1, ny * 8, nx * 8)
        self.point_features, self.max_points, self.max_voxels = point_features, max_points, max_voxels
        c = base_channels
        self.stem = SparseConv(point_features, c)
        stages, shape = [], self.sparse_shape
        for i, (cin, cout) in enumerate(((c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c))):
            pad = (0, 1, 1) if i == 2 else 1
            stages.append(nn.Sequential(SparseBasicBlock(cin), SparseBasicBlock(cin),
                                        SparseConv(cin, cout, 3, 2, pad, subm=False)))
            shape = conv_output_shape(shape, 3, 2, pad)
        stages.append(nn.Sequential(SparseBasicBlock(8 * c), SparseBasicBlock(8 * c)))
        self.stages = nn.Sequential(*stages)
        z_out = conv_output_shape(shape, (3, 1, 1), (2, 1, 1), 0)[0]
        if channels % z_out:
            raise ValueError(f"lidar.channels ({channels}) must be a multiple of the {z_out} z levels left")
        self.out = SparseConv(8 * c, channels // z_out, (3, 1, 1), (2, 1, 1), 0, subm=False)
        self.channels = channels

    def forward(self, points: list[Tensor]) -> Tensor:
        """Frames: points in the ego frame, (x, y, z, features...); the output on the ego grid.

        Shapes:
            points: B tensors (P_b, F)   returns: (B, C, Y, X)
        """
        pts = [p[:, : self.point_features].float() for p in points]
        vox = voxelize_batch(pts, self.voxel_size, self.point_range, self.max_points, self.max_voxels)
        m = vox.features.shape[1]
        mask = (torch.arange(m, device=vox.features.device).view(1, m) < vox.num_points.view(-1, 1)).unsqueeze(-1)
        mean = (vox.features * mask).sum(1) / vox.num_points.clamp(min=1).view(-1, 1).to(vox.features.dtype)
        x = SparseVoxels.from_voxels(mean, vox.coords, self.sparse_shape, len(points))
        x = self.out(self.stages(self.stem(x)))
        dense = x.dense()  # (B, C, Z_out, Y, X)
        b, c, z, y, xx = dense.shape
        return dense.reshape(b, c * z, y, xx).contiguous()
