"""BEVFormer's encoder: BEV queries that read the cameras through deformable spatial cross-attention
(``ops.deform_attn`` at pillar reference points projected into each camera) and the previous BEV
through temporal self-attention (the previous map aligned by ego motion with ``ops.bev_warp``).

Frames: queries are the cells of the ego-frame grid, cell (iy, ix) at
``(xmin + (ix + 0.5) dx, ymin + (iy + 0.5) dy)``; a pillar's reference points sit at ``num_z``
heights spread over the grid's z range. ``deform_attn`` locations are normalised ``(x, y)`` in
``[0, 1]`` with ``grid_sample``'s convention, so a pixel ``u`` of a stride-``s`` map of width ``W``
is at ``(u + 0.5) / (s W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevkit.models.config import GridConfig
from bevkit.models.view_transforms import rigid_inverse
from bevkit.ops import bev_warp, deform_attn
from bevkit.ops.precision import at_least_float32, full_precision


def deform_attn_fp32(value: Tensor, shapes, loc: Tensor, attn: Tensor, impl=deform_attn) -> Tensor:
    """A deformable attention ``impl`` (default ``ops.deform_attn``) in float32 even under autocast
    (the fast path's compressed-row backward product has no bf16/fp16 kernel on CPU).

    ``impl`` is any function of ``ops.deform_attn``'s signature, e.g. ``ops.deform_attn_reference``
    (one ``grid_sample`` per level, which materialises every sample) for memory comparisons.

    Shapes:
        value: (B, S, heads, Dh)   loc: (B, Q, heads, L, P, 2)   attn: (B, Q, heads, L, P)
        returns: (B, Q, heads * Dh) float32
    """
    with full_precision(value):
        return impl(value.float(), shapes, loc.float(), attn.float())


class TemporalSelfAttention(nn.Module):
    """Deformable attention of each BEV query over two maps: the previous BEV aligned to the
    current frame and the current queries (two 'levels' of ``deform_attn``, attention weights
    normalised jointly over both). Offsets and weights are predicted from the query concatenated
    with the aligned previous BEV, as in BEVFormer. Without history the queries stand in for it.
    ``impl``: the deformable attention function (``ops.deform_attn`` or one of its siblings)."""

    def __init__(self, dim: int, heads: int, points: int, impl=deform_attn):
        super().__init__()
        self.heads, self.points, self.impl = heads, points, impl
        self.offsets = nn.Linear(2 * dim, heads * 2 * points * 2)
        self.weights = nn.Linear(2 * dim, heads * 2 * points)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, query: Tensor, prev: Tensor, ref: Tensor, shape: tuple[int, int]) -> Tensor:
        """Shapes:
            query, prev: (B, Q, C) with Q = Y * X   ref: (Q, 2) normalised cell centres
            returns: (B, Q, C)
        """
        b, q, c = query.shape
        ny, nx = shape
        h, p = self.heads, self.points
        value = self.value(torch.cat([prev, query], dim=1)).view(b, 2 * q, h, c // h)  # (B, 2Q, heads, Dh)
        qp = torch.cat([query, prev], dim=-1)  # (B, Q, 2C)
        off = self.offsets(qp).view(b, q, h, 2, p, 2) / query.new_tensor([nx, ny])  # cells -> normalised
        loc = ref.view(1, q, 1, 1, 1, 2) + off  # (B, Q, heads, 2, P, 2)
        attn = self.weights(qp).view(b, q, h, 2 * p).softmax(-1).view(b, q, h, 2, p)
        return self.out(deform_attn_fp32(value, [(ny, nx), (ny, nx)], loc, attn, self.impl))


class SpatialCrossAttention(nn.Module):
    """Deformable attention of each BEV query into every camera at its pillar's reference points
    (``num_z`` heights, ``points_per_z`` samples around each); cameras that see at least one
    reference point are averaged, as in BEVFormer. ``impl``: the deformable attention function
    (``ops.deform_attn`` or one of its siblings)."""

    def __init__(self, dim: int, heads: int, num_z: int, points_per_z: int, impl=deform_attn):
        super().__init__()
        self.heads, self.num_z, self.ppz, self.impl = heads, num_z, points_per_z, impl
        p = num_z * points_per_z
        self.offsets = nn.Linear(dim, heads * p * 2)
        self.weights = nn.Linear(dim, heads * p)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, query: Tensor, feats: Tensor, ref_cam: Tensor, seen: Tensor) -> Tensor:
        """Shapes:
            query: (B, Q, C)   feats: (B, N, C, H, W)
            ref_cam: (B, N, Q, Z, 2) normalised image locations   seen: (B, N, Q, Z) bool
            returns: (B, Q, C)
        """
        b, q, c = query.shape
        n, hf, wf = feats.shape[1], feats.shape[3], feats.shape[4]
        h, z, k = self.heads, self.num_z, self.ppz
        value = self.value(feats.flatten(3).transpose(2, 3)).view(b * n, hf * wf, h, c // h)  # (B*N, S, heads, Dh)
        off = self.offsets(query).view(b, 1, q, h, z, k, 2) / query.new_tensor([wf, hf])  # pixels of the map
        loc = ref_cam.view(b, n, q, 1, z, 1, 2) + off  # (B, N, Q, heads, Z, k, 2)
        attn = self.weights(query).view(b, q, h, z * k).softmax(-1)
        attn = attn.view(b, 1, q, h, 1, z * k).expand(b, n, q, h, 1, z * k)
        out = deform_attn_fp32(value, [(hf, wf)], loc.reshape(b * n, q, h, 1, z * k, 2),
                               attn.reshape(b * n, q, h, 1, z * k), self.impl).view(b, n, q, c)
        hit = seen.any(-1).to(out.dtype)  # (B, N, Q)
        out = (out * hit.unsqueeze(-1)).sum(1) / hit.sum(1).clamp(min=1).unsqueeze(-1)
        return self.out(out)


class BEVFormerLayer(nn.Module):
    """Temporal self-attention, norm, spatial cross-attention, norm, feed-forward, norm."""

    def __init__(self, dim: int, heads: int, num_z: int, points_per_z: int, tsa_points: int, ffn: int,
                 impl=deform_attn):
        super().__init__()
        self.tsa = TemporalSelfAttention(dim, heads, tsa_points, impl)
        self.sca = SpatialCrossAttention(dim, heads, num_z, points_per_z, impl)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: Tensor, prev: Tensor, ref_bev: Tensor, shape, feats: Tensor, ref_cam: Tensor,
                seen: Tensor) -> Tensor:
        """Shapes:
            q, prev: (B, Q, C)   ref_bev: (Q, 2)   feats: (B, N, C, H, W)
            ref_cam: (B, N, Q, Z, 2)   seen: (B, N, Q, Z)   returns: (B, Q, C)
        """
        q = self.norms[0](q + self.tsa(q, prev, ref_bev, shape))
        q = self.norms[1](q + self.sca(q, feats, ref_cam, seen))
        return self.norms[2](q + self.ffn(q))


class BEVFormerEncoder(nn.Module):
    """BEVFormer's encoder as a view transform: learned BEV queries with a learned positional
    embedding, ``layers`` x (temporal self-attention, spatial cross-attention, FFN).

    The previous BEV is state passed in (``prev_bev`` with its ``curr_from_prev``) and the output is
    the next call's state; without it the queries attend to themselves (BEVFormer's first frame).

    ``impl`` is the deformable attention both attentions run: ``ops.deform_attn`` (the default, the
    sparse fast path) or a function of the same signature such as ``ops.deform_attn_reference``
    (chosen by name with ``view_transform.deform_attn``; same results, different memory and speed).

    Each camera's features get a learned embedding of their own (``cam_embed``, one row per camera
    in input order, as BEVFormer's ``cams_embeds``), so the values the spatial cross-attention
    reads tell the cameras apart. A state dict from before, with one embedding shared by every camera
    (``(1, 1, C, 1, 1)``), loads as that embedding in every row: the same function.
    """

    def __init__(self, in_channels: int, channels: int, grid: GridConfig, stride: int, layers: int = 3,
                 heads: int = 8, num_z: int = 4, points_per_z: int = 2, tsa_points: int = 4, ffn: int = 512,
                 impl=deform_attn, num_cameras: int = 6):
        super().__init__()
        ny, nx = grid.shape
        self.grid, self.stride, self.channels, self.num_z = grid, stride, channels, num_z
        self.input_proj = nn.Conv2d(in_channels, channels, 1)
        self.queries = nn.Parameter(torch.randn(ny * nx, channels) * 0.02)
        self.row_embed = nn.Parameter(torch.randn(ny, channels // 2) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(nx, channels - channels // 2) * 0.02)
        self.cam_embed = nn.Parameter(torch.randn(num_cameras, channels) * 0.02)  # (N, C)
        self.layers = nn.ModuleList(BEVFormerLayer(channels, heads, num_z, points_per_z, tsa_points, ffn, impl)
                                    for _ in range(layers))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "cam_embed"
        old = state_dict.get(key)
        if old is not None and old.dim() == 5 and old.shape[:2] == (1, 1) and old.shape[3:] == (1, 1):
            # one embedding shared by all cameras (before per-camera embeddings): the same in every row
            state_dict[key] = old.view(1, -1).expand_as(self.cam_embed).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def pillar_points(self, like: Tensor) -> Tensor:
        """Ego-frame reference points: ``num_z`` heights per cell, evenly inside the z range.

        Shapes:
            returns: (Y * X, Z, 3)
        """
        g = self.grid.bev_grid()
        x = g.xmin + (torch.arange(g.nx, dtype=like.dtype, device=like.device) + 0.5) * g.dx
        y = g.ymin + (torch.arange(g.ny, dtype=like.dtype, device=like.device) + 0.5) * g.dy
        dz = (g.zmax - g.zmin) / self.num_z
        z = g.zmin + (torch.arange(self.num_z, dtype=like.dtype, device=like.device) + 0.5) * dz
        yy, xx, zz = torch.meshgrid(y, x, z, indexing="ij")  # (Y, X, Z)
        return torch.stack([xx, yy, zz], dim=-1).view(g.ny * g.nx, self.num_z, 3)

    def forward(self, feats: Tensor, intrinsics: Tensor, img_aug: Tensor, ego_from_cam: Tensor,
                prev_bev: Tensor | None = None, curr_from_prev: Tensor | None = None,
                prev_valid: Tensor | None = None) -> tuple[Tensor, None]:
        """Without ``prev_bev`` the queries stand in for the history; ``prev_valid`` (an exported graph,
        which always reads a ``prev_bev``) says per sample whether ``prev_bev`` holds one (False: the
        queries stand in, as without it).

        Shapes:
            feats: (B, N, C_in, H, W)   intrinsics, img_aug: (B, N, 3, 3)   ego_from_cam: (B, N, 4, 4)
            prev_bev: (B, 1, C, Y, X) or None   curr_from_prev: (B, 1, 4, 4)   prev_valid: (B,) bool or None
            returns: bev (B, C, Y, X), None (no depth distribution)
        """
        b, n, _, hf, wf = feats.shape
        ny, nx = self.grid.shape
        if n != self.cam_embed.shape[0]:
            raise ValueError(f"BEVFormer encoder: built with embeddings for {self.cam_embed.shape[0]} cameras, got "
                             f"{n} (model.view_transform.num_cameras, or build_model's num_cameras, must equal the "
                             f"number of data.cameras)")
        x = self.input_proj(feats.flatten(0, 1)).view(b, n, self.channels, hf, wf)
        x = x + self.cam_embed.view(1, n, self.channels, 1, 1)
        pos = torch.cat([self.row_embed.view(ny, 1, -1).expand(ny, nx, -1),
                         self.col_embed.view(1, nx, -1).expand(ny, nx, -1)], dim=-1).view(ny * nx, -1)
        q = (self.queries + pos).unsqueeze(0).expand(b, -1, -1)  # (B, Q, C)
        with torch.no_grad(), full_precision(feats):  # the projection in float32 whatever autocast does
            pts = at_least_float32(self.pillar_points(feats))  # (Q, Z, 3)
            cam_from_ego = rigid_inverse(ego_from_cam.to(pts.dtype))
            cam = torch.einsum("bnij,qzj->bnqzi", cam_from_ego[..., :3, :3], pts) + cam_from_ego[..., None, None, :3, 3]
            uvw = torch.einsum("bnij,bnqzj->bnqzi", img_aug.to(pts.dtype) @ intrinsics.to(pts.dtype), cam)
            front = uvw[..., 2] > 0.1
            uv = uvw[..., :2] / torch.where(front, uvw[..., 2], torch.ones_like(uvw[..., 2])).unsqueeze(-1)
            ref_cam = (uv + 0.5) / uv.new_tensor([self.stride * wf, self.stride * hf])  # (B, N, Q, Z, 2)
            seen = front & (ref_cam >= 0).all(-1) & (ref_cam <= 1).all(-1)
            ref_cam = torch.where(seen.unsqueeze(-1), ref_cam, torch.full_like(ref_cam, -2.0))  # far off the map
            ref_bev = torch.stack(torch.meshgrid((torch.arange(ny, dtype=q.dtype, device=q.device) + 0.5) / ny,
                                                 (torch.arange(nx, dtype=q.dtype, device=q.device) + 0.5) / nx,
                                                 indexing="ij")[::-1], dim=-1).view(ny * nx, 2)  # (x, y)
        if prev_bev is None:
            prev = q
        else:
            aligned = bev_warp(prev_bev[:, 0], curr_from_prev[:, 0].to(q.dtype), self.grid.spec())  # (B, C, Y, X)
            prev = aligned.flatten(2).transpose(1, 2)  # (B, Q, C)
            if prev_valid is not None:
                prev = torch.where(prev_valid.view(-1, 1, 1), prev, q)
        for layer in self.layers:
            q = layer(q, prev, ref_bev, (ny, nx), x, ref_cam, seen)
        return q.transpose(1, 2).reshape(b, self.channels, ny, nx), None
