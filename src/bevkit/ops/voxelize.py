"""Points to voxels / pillars (hard voxelisation) and the pillar scatter to a BEV map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Voxels",
    "voxelize",
    "voxelize_reference",
    "voxelize_batch",
    "pillar_scatter",
    "pillar_scatter_reference",
]


@dataclass(frozen=True)
class Voxels:
    """Hard-voxelised point cloud.

    Fields (V voxels kept, M = max points per voxel, F point features):
        features: (V, M, F) points of each voxel in input order, zero-padded.
        coords: (V, 3) int64 voxel index ``(iz, iy, ix)``; with a batch, (V, 4) ``(b, iz, iy, ix)``.
        num_points: (V,) int64 points stored per voxel (at most M).
    """

    features: Tensor
    coords: Tensor
    num_points: Tensor


def _voxel_ids(points: Tensor, voxel_size, point_range):
    """Per-point (iz, iy, ix), the in-range mask and the grid size (nz, ny, nx)."""
    lo = points.new_tensor(point_range[:3])
    hi = points.new_tensor(point_range[3:])
    size = points.new_tensor(voxel_size)
    grid = [int(round((point_range[3 + a] - point_range[a]) / voxel_size[a])) for a in range(3)]
    idx = torch.floor((points[:, :3] - lo) / size)  # (P, 3) x, y, z
    ok = ((idx >= 0) & (idx < idx.new_tensor(grid))).all(dim=1) & ((points[:, :3] < hi).all(dim=1))
    return idx.long().flip(1), ok, tuple(reversed(grid))


def voxelize(points: Tensor, voxel_size, point_range, max_points: int, max_voxels: int) -> Voxels:
    """Hard voxelisation, vectorised and deterministic.

    A point ``(x, y, z, ...)`` in the ego (or lidar) frame belongs to voxel
    ``floor((p - range_min) / voxel_size)`` when inside ``point_range``
    ``(xmin, ymin, zmin, xmax, ymax, zmax)``. Voxels are ordered by the first point
    that falls in them; each keeps its first ``max_points`` points in input order;
    voxels beyond ``max_voxels`` are dropped. Pillars are voxels one cell tall in z.
    Same result as :func:`voxelize_reference`, but with one sort instead of a
    Python loop.

    Shapes:
        points: (P, F) with F >= 3 (x, y, z first)
        returns: Voxels(features (V, M, F), coords (V, 3) (iz, iy, ix), num_points (V,))
    """
    zyx, ok, (nz, ny, nx) = _voxel_ids(points, voxel_size, point_range)
    point_index = ok.nonzero().squeeze(1)  # (P_in,) input order
    lin = ((zyx[:, 0] * ny + zyx[:, 1]) * nx + zyx[:, 2])[point_index]
    num_feat = points.shape[1]
    if lin.numel() == 0:
        return Voxels(points.new_zeros(0, max_points, num_feat),
                      torch.zeros(0, 3, dtype=torch.long, device=points.device),
                      torch.zeros(0, dtype=torch.long, device=points.device))
    # Stable sort by voxel keeps input order inside each voxel.
    lin_sorted, order = torch.sort(lin, stable=True)
    new_group = torch.ones_like(lin_sorted, dtype=torch.bool)
    new_group[1:] = lin_sorted[1:] != lin_sorted[:-1]
    group = new_group.cumsum(0) - 1  # (P_in,) group of each sorted point
    starts = new_group.nonzero().squeeze(1)  # (G,) first sorted position of each voxel
    first_point = order[starts]  # earliest input position of each voxel
    rank = torch.empty_like(first_point)
    rank[torch.argsort(first_point)] = torch.arange(first_point.numel(), device=points.device)
    slot = torch.arange(lin_sorted.numel(), device=points.device) - starts[group]
    voxel_rank = rank[group]  # (P_in,) output voxel of each sorted point
    keep = (slot < max_points) & (voxel_rank < max_voxels)
    num_voxels = min(int(first_point.numel()), max_voxels)
    feats = points.new_zeros(num_voxels, max_points, num_feat)
    feats[voxel_rank[keep], slot[keep]] = points[point_index[order[keep]]]
    counts = torch.bincount(group, minlength=first_point.numel()).clamp(max=max_points)
    kept_groups = torch.argsort(first_point)[:num_voxels]
    coords = zyx[point_index[first_point[kept_groups]]]
    return Voxels(feats, coords, counts[kept_groups])


def voxelize_reference(points: Tensor, voxel_size, point_range, max_points: int,
                       max_voxels: int) -> Voxels:
    """Reference hard voxelisation: a Python loop over the points in input order.

    Shapes:
        points: (P, F)   returns: Voxels(features (V, M, F), coords (V, 3), num_points (V,))
    """
    zyx, ok, _ = _voxel_ids(points, voxel_size, point_range)
    slots: dict[tuple[int, int, int], list[int]] = {}
    for i in range(points.shape[0]):
        if not bool(ok[i]):
            continue
        key = tuple(int(v) for v in zyx[i])
        if key not in slots:
            if len(slots) >= max_voxels:
                continue
            slots[key] = []
        if len(slots[key]) < max_points:
            slots[key].append(i)
    feats = points.new_zeros(len(slots), max_points, points.shape[1])
    coords = torch.zeros(len(slots), 3, dtype=torch.long, device=points.device)
    counts = torch.zeros(len(slots), dtype=torch.long, device=points.device)
    for v, (key, members) in enumerate(slots.items()):
        coords[v] = torch.tensor(key)
        counts[v] = len(members)
        for j, i in enumerate(members):
            feats[v, j] = points[i]
    return Voxels(feats, coords, counts)


def voxelize_batch(point_clouds: list[Tensor], voxel_size, point_range, max_points: int,
                   max_voxels: int) -> Voxels:
    """Voxelise each cloud of a batch and concatenate, prefixing coords with the batch index.

    Shapes:
        point_clouds: B tensors (P_b, F)
        returns: Voxels(features (V, M, F), coords (V, 4) (b, iz, iy, ix), num_points (V,))
    """
    parts = [voxelize(p, voxel_size, point_range, max_points, max_voxels) for p in point_clouds]
    coords = [torch.nn.functional.pad(v.coords, (1, 0), value=b) for b, v in enumerate(parts)]
    return Voxels(torch.cat([v.features for v in parts]), torch.cat(coords),
                  torch.cat([v.num_points for v in parts]))


def pillar_scatter(pillar_feats: Tensor, coords: Tensor, batch_size: int, grid_yx: tuple[int, int]) -> Tensor:
    """Scatter pillar features to a BEV map (PointPillars), one indexed write; exportable.

    Each pillar must occupy a distinct cell (as voxelisation guarantees).
    Frames: ``coords`` index the BEV grid, cell (iy, ix) with X along ego forward.

    Shapes:
        pillar_feats: (V, C)   coords: (V, 4) (b, iz, iy, ix) int64, iz ignored
        returns: (B, C, Y, X)
    """
    ny, nx = grid_yx
    c = pillar_feats.shape[1]
    flat = (coords[:, 0] * ny + coords[:, 2]) * nx + coords[:, 3]  # (V,)
    out = pillar_feats.new_zeros(batch_size * ny * nx, c)
    out = out.index_put((flat,), pillar_feats)  # (B*Y*X, C)
    return out.view(batch_size, ny, nx, c).permute(0, 3, 1, 2)


def pillar_scatter_reference(pillar_feats: Tensor, coords: Tensor, batch_size: int,
                             grid_yx: tuple[int, int]) -> Tensor:
    """Reference pillar scatter: a loop writing one pillar at a time.

    Shapes:
        pillar_feats: (V, C)   coords: (V, 4) (b, iz, iy, ix)   returns: (B, C, Y, X)
    """
    ny, nx = grid_yx
    out = pillar_feats.new_zeros(batch_size, pillar_feats.shape[1], ny, nx)
    for v in range(pillar_feats.shape[0]):
        b, _, iy, ix = (int(t) for t in coords[v])
        out[b, :, iy, ix] = pillar_feats[v]
    return out
