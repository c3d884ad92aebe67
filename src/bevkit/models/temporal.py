"""Temporal fusion with state passed in and out (never stored on the module)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevkit.models.config import GridConfig
from bevkit.ops import bev_warp


def curr_from_prev(global_from_ego_curr: Tensor, global_from_ego_prev: Tensor) -> Tensor:
    """Ego motion between two keyframes: ``curr_from_prev = inv(global_from_ego_curr) @ global_from_ego_prev``,
    computed in float64 (global coordinates are large) and returned in float32.

    Shapes:
        global_from_ego_curr: (B, 4, 4)   global_from_ego_prev: (B, 4, 4) or (B, T, 4, 4)
        returns: like ``global_from_ego_prev``
    """
    curr = global_from_ego_curr.double()
    if global_from_ego_prev.dim() == 4:
        curr = curr.unsqueeze(1)
    rot_t = curr[..., :3, :3].transpose(-1, -2)
    ego_from_global = torch.zeros_like(curr)
    ego_from_global[..., :3, :3] = rot_t
    ego_from_global[..., :3, 3] = -(rot_t @ curr[..., :3, 3:4]).squeeze(-1)
    ego_from_global[..., 3, 3] = 1.0
    return (ego_from_global @ global_from_ego_prev.double()).float()


class BEVDet4D(nn.Module):
    """BEVDet4D: the BEV maps of ``frames - 1`` previous keyframes are warped into the current ego
    frame by ego motion (``ops.bev_warp``) and concatenated with the current one. Without history
    (the first frame of a sequence) the current map stands in for the missing frames, as BEVDet4D
    does."""

    def __init__(self, grid: GridConfig, channels: int, frames: int):
        super().__init__()
        if frames < 2:
            raise ValueError("BEVDet4D: frames must be >= 2 (current + history)")
        self.grid = grid
        self.frames = frames
        self.out_channels = channels * frames

    def forward(self, bev: Tensor, prev_bev: Tensor | None = None, curr_from_prev: Tensor | None = None) -> Tensor:
        """Frames: ``prev_bev[:, t]`` on the grid of ego at keyframe t (most recent first);
        ``curr_from_prev[:, t]`` maps that ego frame to the current one.

        Shapes:
            bev: (B, C, Y, X)   prev_bev: (B, T-1, C, Y, X) or None   curr_from_prev: (B, T-1, 4, 4)
            returns: (B, T*C, Y, X)
        """
        if prev_bev is None:
            return torch.cat([bev] + [bev.detach()] * (self.frames - 1), dim=1)
        if prev_bev.shape[1] != self.frames - 1:
            raise ValueError(f"BEVDet4D: expected {self.frames - 1} history maps, got {prev_bev.shape[1]}")
        b, t, c, ny, nx = prev_bev.shape
        warped = bev_warp(prev_bev.flatten(0, 1), curr_from_prev.flatten(0, 1).to(bev.dtype), self.grid.spec())
        return torch.cat([bev, warped.view(b, t * c, ny, nx)], dim=1)
