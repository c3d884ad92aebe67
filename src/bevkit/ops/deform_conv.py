"""Deformable convolution (DCN v1, as BEVDepth's depth net uses) without a compiled kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import full_precision

__all__ = ["deform_conv2d", "deform_conv2d_reference"]


def _check(x: Tensor, offset: Tensor, weight: Tensor, groups: int) -> tuple[int, int]:
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"deform_conv2d: {c} input channels, weight {tuple(weight.shape)} and {groups} groups "
                         f"do not fit")
    if offset.dim() != 4 or offset.shape[0] != b or offset.shape[-2:] != (h, w) or offset.shape[1] % (2 * kh * kw):
        raise ValueError(f"deform_conv2d: offset must be (B, 2 * offset_groups * {kh} * {kw}, {h}, {w}), "
                         f"got {tuple(offset.shape)}")
    og = offset.shape[1] // (2 * kh * kw)
    if c % og:
        raise ValueError(f"deform_conv2d: {c} channels do not split into {og} offset groups")
    return kh, kw


def _sampling_grid(offset: Tensor, kh: int, kw: int, padding: int, dilation: int) -> Tensor:
    """Absolute sampling positions (x, y) in pixels of every tap of every output cell.

    Shapes:
        offset: (B, 2 * G * kh * kw, H, W), per tap (dy, dx)   returns: (B, G, kh * kw, H, W, 2) as (x, y)
    """
    b, _, h, w = offset.shape
    off = offset.view(b, -1, kh * kw, 2, h, w)  # (B, G, taps, (dy, dx), H, W)
    dev, dt = offset.device, offset.dtype
    ty, tx = torch.meshgrid(torch.arange(kh, device=dev, dtype=dt), torch.arange(kw, device=dev, dtype=dt),
                            indexing="ij")
    oy, ox = torch.meshgrid(torch.arange(h, device=dev, dtype=dt), torch.arange(w, device=dev, dtype=dt),
                            indexing="ij")
    py = oy - padding + (ty.reshape(-1, 1, 1) * dilation) + off[:, :, :, 0]  # (B, G, taps, H, W)
    px = ox - padding + (tx.reshape(-1, 1, 1) * dilation) + off[:, :, :, 1]
    return torch.stack([px, py], -1)


def deform_conv2d(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 0,
                  dilation: int = 1, groups: int = 1) -> Tensor:
    """A stride-1 deformable convolution: tap k of output cell p reads ``x`` bilinearly at
    ``p - padding + k * dilation + offset_k(p)`` (zero outside the map), as
    ``torchvision.ops.deform_conv2d`` defines it; every tap of every offset group in one ``grid_sample``,
    then one grouped matrix product. Exports to ONNX (``grid_sample`` and ``matmul``).

    Shapes:
        x: (B, C, H, W)   offset: (B, 2 * G * kh * kw, H, W), per tap (dy, dx), G offset groups
        weight: (O, C / groups, kh, kw)   bias: (O,) or None   returns: (B, O, H, W)
    """
    kh, kw = _check(x, offset, weight, groups)
    b, c, h, w = x.shape
    taps = kh * kw
    # Tap positions in float32 at least: half floats round them to a few pixels.
    pos_dtype = torch.promote_types(x.dtype, torch.float32)  # no copy of x just for its dtype
    with full_precision(x):
        pos = _sampling_grid(offset.to(pos_dtype), kh, kw, padding, dilation)  # (B, G, taps, H, W, 2)
        g = pos.shape[1]
        # Pixel centres at integer coordinates: normalised u = (2 x + 1) / W - 1 with align_corners=False.
        size = torch.tensor([w, h], device=x.device, dtype=pos_dtype)
        grid = (2 * pos + 1) / size - 1
    grid = grid.view(b * g, taps * h, w, 2)
    dtype = x.dtype
    if dtype != grid.dtype:  # grid_sample takes one dtype: sample a float32 copy of a half input
        x = x.float()
    cols = F.grid_sample(x.reshape(b * g, c // g, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).to(dtype)  # (B*G, C/G, taps*H, W)
    cols = cols.view(b, c, taps, h * w)
    o = weight.shape[0]
    cols = cols.view(b, groups, (c // groups) * taps, h * w)
    wmat = weight.reshape(groups, o // groups, (c // groups) * taps)
    out = torch.matmul(wmat.unsqueeze(0), cols).reshape(b, o, h, w)  # (B, groups, O/groups, H*W)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1)
    return out


def deform_conv2d_reference(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                            padding: int = 0, dilation: int = 1, groups: int = 1) -> Tensor:
    """Reference: explicit bilinear gathers of the four neighbours per tap, one tap at a time, and a
    sum of per-tap 1x1 products.

    Shapes: as :func:`deform_conv2d`.
    """
    kh, kw = _check(x, offset, weight, groups)
    b, c, h, w = x.shape
    pos = _sampling_grid(offset.to(x.dtype), kh, kw, padding, dilation)  # (B, G, taps, H, W, 2)
    g = pos.shape[1]
    o = weight.shape[0]
    out = x.new_zeros(b, o, h, w)
    flat = x.reshape(b, g, c // g, h * w)
    for k in range(kh * kw):
        px, py = pos[:, :, k, ..., 0], pos[:, :, k, ..., 1]  # (B, G, H, W)
        x0, y0 = torch.floor(px), torch.floor(py)
        sampled = x.new_zeros(b, g, c // g, h, w)
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                wgt = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().view(b, g, 1, h * w)
                vals = torch.gather(flat, 3, idx.expand(b, g, c // g, h * w)).view(b, g, c // g, h, w)
                sampled = sampled + vals * (wgt * inside).unsqueeze(2)
        sampled = sampled.view(b, groups, c // groups, h, w)
        wk = weight[:, :, k // kw, k % kw].view(groups, o // groups, c // groups)
        out = out + torch.einsum("goc,bgchw->bgohw", wk, sampled).reshape(b, o, h, w)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1)
    return out
