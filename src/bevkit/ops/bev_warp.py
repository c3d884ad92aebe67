"""Warp a BEV map from the previous ego frame into the current one (temporal fusion, map prior)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bev_pool import BEVGridSpec

__all__ = ["bev_warp", "bev_warp_reference"]


def _prev_xy_of_curr_cells(curr_from_prev: Tensor, grid: BEVGridSpec):
    """Affine map (in metres) from current-frame cell centres (z = 0) to previous-frame x, y.

    ``curr_from_prev`` is rigid, so ``prev_from_curr = [R.T | -R.T t]`` in closed form
    (no matrix inverse in the exported graph).
    """
    rot_t = curr_from_prev[:, :3, :3].transpose(1, 2)  # prev_from_curr rotation (B, 3, 3)
    shift = -(rot_t @ curr_from_prev[:, :3, 3:4]).squeeze(-1)  # (B, 3)
    return rot_t[:, :2, :2], shift[:, :2]  # rotation (B, 2, 2), shift (B, 2)


def bev_warp(bev_prev: Tensor, curr_from_prev: Tensor, grid: BEVGridSpec) -> Tensor:
    """Resample a BEV map from the previous ego frame onto the current ego frame's grid.

    Each current cell centre ``(x, y, 0)`` in ``ego_curr`` is mapped to ``ego_prev``
    by ``prev_from_curr = inv(curr_from_prev)`` (``curr_from_prev`` must be rigid;
    only the resulting x, y are used, i.e. the BEV planes are treated as parallel,
    as BEVDet4D does) and ``bev_prev`` is read there bilinearly; positions off the previous map read
    zero. One ``affine_grid`` + ``grid_sample`` (align_corners=False), so it is
    differentiable in ``bev_prev`` and ``curr_from_prev`` and exports to ONNX.

    Frames: ``bev_prev`` is in ``ego_prev`` and the result in ``ego_curr``, both on
    ``grid`` (cell (iy, ix) at ``(xmin + (ix + 0.5) dx, ymin + (iy + 0.5) dy)``).

    Shapes:
        bev_prev: (B, C, Y, X)   curr_from_prev: (B, 4, 4)   returns: (B, C, Y, X)
    """
    rot, shift = _prev_xy_of_curr_cells(curr_from_prev, grid)
    (xmin, xmax, _), (ymin, ymax, _) = grid.xbound, grid.ybound
    centre = rot.new_tensor([(xmin + xmax) / 2, (ymin + ymax) / 2])  # metres
    half = rot.new_tensor([(xmax - xmin) / 2, (ymax - ymin) / 2])
    # Normalised u = (x - centre) / half on both sides: u_prev = A u_curr + a.
    lin = rot * half.view(1, 1, 2) / half.view(1, 2, 1)  # (B, 2, 2)
    off = ((rot @ centre + shift) - centre) / half  # (B, 2)
    theta = torch.cat((lin, off.unsqueeze(-1)), dim=-1)  # (B, 2, 3)
    sample = F.affine_grid(theta, list(bev_prev.shape), align_corners=False)  # (B, Y, X, 2)
    return F.grid_sample(bev_prev, sample, mode="bilinear", padding_mode="zeros", align_corners=False)


def bev_warp_reference(bev_prev: Tensor, curr_from_prev: Tensor, grid: BEVGridSpec) -> Tensor:
    """Reference warp: explicit cell centres, explicit bilinear gathers with zero padding.

    Shapes:
        bev_prev: (B, C, Y, X)   curr_from_prev: (B, 4, 4)   returns: (B, C, Y, X)
    """
    b, c, ny, nx = bev_prev.shape
    (xmin, _, dx), (ymin, _, dy) = grid.xbound, grid.ybound
    rot, shift = _prev_xy_of_curr_cells(curr_from_prev, grid)
    ix = torch.arange(nx, dtype=bev_prev.dtype, device=bev_prev.device)
    iy = torch.arange(ny, dtype=bev_prev.dtype, device=bev_prev.device)
    x_curr = (xmin + (ix + 0.5) * dx).view(1, 1, nx).expand(b, ny, nx)
    y_curr = (ymin + (iy + 0.5) * dy).view(1, ny, 1).expand(b, ny, nx)
    x_prev = rot[:, 0, 0, None, None] * x_curr + rot[:, 0, 1, None, None] * y_curr + shift[:, 0, None, None]
    y_prev = rot[:, 1, 0, None, None] * x_curr + rot[:, 1, 1, None, None] * y_curr + shift[:, 1, None, None]
    fx = (x_prev - xmin) / dx - 0.5  # continuous cell index in the previous map
    fy = (y_prev - ymin) / dy - 0.5
    x0, y0 = torch.floor(fx), torch.floor(fy)
    out = bev_prev.new_zeros(b, c, ny, nx)
    flat = bev_prev.reshape(b, c, ny * nx)
    for cy in (0, 1):
        for cx in (0, 1):
            xi, yi = x0 + cx, y0 + cy
            w = (fx - x0 if cx else 1 - (fx - x0)) * (fy - y0 if cy else 1 - (fy - y0))
            inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            idx = (yi.clamp(0, ny - 1) * nx + xi.clamp(0, nx - 1)).long().view(b, 1, ny * nx)
            vals = torch.gather(flat, 2, idx.expand(b, c, ny * nx)).view(b, c, ny, nx)
            out = out + vals * (w * inside).unsqueeze(1)
    return out
