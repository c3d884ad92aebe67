"""Multi-scale deformable attention (Deformable DETR / BEVFormer) without a CUDA kernel."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["deform_attn", "deform_attn_reference", "deform_attn_exportable"]

LevelShapes = Sequence[Sequence[int]]


def _level_shapes(spatial_shapes: LevelShapes | Tensor) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor, attn: Tensor) -> None:
    b, s, m, _ = value.shape
    if s != sum(h * w for h, w in shapes):
        raise ValueError(f"value has S={s} but spatial_shapes sum to {sum(h * w for h, w in shapes)}")
    if loc.dim() != 6 or loc.shape[-1] != 2 or loc.shape[0] != b or loc.shape[2] != m:
        raise ValueError(f"sampling_locations must be (B, Q, heads, L, P, 2), got {tuple(loc.shape)}")
    if loc.shape[3] != len(shapes) or tuple(attn.shape) != tuple(loc.shape[:-1]):
        raise ValueError("attention_weights must be (B, Q, heads, L, P) matching sampling_locations")


def deform_attn_reference(
    value: Tensor, spatial_shapes: LevelShapes | Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Reference: one ``grid_sample`` per level (bilinear, zeros padding, align_corners=False).

    ``sampling_locations`` are normalised to [0, 1] per level, (x, y) with x along
    the feature map's width; location ``u`` reads pixel coordinate ``u * W - 0.5``.
    Materialises the sampled (B*heads, Dh, Q, L*P) tensor.

    Frames: ``value`` rows are the flattened multi-level feature maps (level by
    level, row-major ``(H_l, W_l)``); queries are whatever the caller samples for
    (BEV cells for BEVFormer's encoder).

    Shapes:
        value: (B, S, heads, Dh) with S = sum_l H_l * W_l   spatial_shapes: L pairs (H_l, W_l)
        sampling_locations: (B, Q, heads, L, P, 2)   attention_weights: (B, Q, heads, L, P)
        returns: (B, Q, heads * Dh)
    """
    shapes = _level_shapes(spatial_shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    b, _, m, dh = value.shape
    _, q, _, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_list[level].flatten(2).transpose(1, 2).reshape(b * m, dh, h, w)  # (B*heads, Dh, H, W)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*heads, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, Dh, Q, L*P)
    attn = attention_weights.transpose(1, 2).reshape(b * m, 1, q, num_levels * num_points)
    out = (stacked * attn).sum(-1).view(b, m * dh, q)  # (B, heads*Dh, Q)
    return out.transpose(1, 2).contiguous()


def _level_factors(x: Tensor, y: Tensor, h: int, w: int):
    """Bilinear factors of one level. x, y: normalised locations (any shape, contiguous).

    Returns integer corner coordinates clamped into the map ``(ix0, ix1, iy0, iy1)``,
    per-axis weights with zero padding folded in ``(wx0, wx1, wy0, wy1)``, the
    in-map masks ``(vx0, vx1, vy0, vy1)`` as 0/1 floats and the floors ``(x0, y0)``.
    """
    px = x * w - 0.5  # pixel coordinates; align_corners=False
    py = y * h - 0.5
    x0 = torch.floor(px)
    y0 = torch.floor(py)
    fx = px - x0
    fy = py - y0
    vx0 = ((x0 >= 0) & (x0 <= w - 1)).to(x.dtype)
    vx1 = ((x0 >= -1) & (x0 <= w - 2)).to(x.dtype)
    vy0 = ((y0 >= 0) & (y0 <= h - 1)).to(x.dtype)
    vy1 = ((y0 >= -1) & (y0 <= h - 2)).to(x.dtype)
    wx0, wx1 = (1 - fx) * vx0, fx * vx1
    wy0, wy1 = (1 - fy) * vy0, fy * vy1
    ix0 = x0.clamp(0, w - 1).to(torch.int32)
    ix1 = (x0 + 1).clamp_(0, w - 1).to(torch.int32)
    iy0 = y0.clamp(0, h - 1).to(torch.int32)
    iy1 = (y0 + 1).clamp_(0, h - 1).to(torch.int32)
    return (ix0, ix1, iy0, iy1), (wx0, wx1, wy0, wy1), (vx0, vx1, vy0, vy1), (x0, y0)


def _chunk_layout(loc: Tensor, attn: Tensor):
    """Level-major copies of a chunk: loc (R, heads, L, P, 2) -> (L, 2, R, heads, P), attn -> (L, R, heads, P)."""
    return loc.permute(2, 4, 0, 1, 3).contiguous(), attn.permute(2, 0, 1, 3).contiguous()


def _corners(loc_t: Tensor, attn_t: Tensor | None, factors: list, shapes: list[tuple[int, int]],
             starts: list[int], num_values: int, q_total: int, row0: int):
    """CSR entries of a chunk of R flattened (b, q) rows.

    ``loc_t`` (L, 2, R, heads, P) and ``attn_t`` (L, R, heads, P) are the level-major
    rows ``row0 .. row0+R`` of B*Q, ``factors`` their :func:`_level_factors` per level.
    Returns ``col`` (R, heads, L, 4, P) int32, the value row ``(b*S + s)*heads + head``
    of each corner (y0x0, y0x1, y1x0, y1x1), clamped into the map, and ``wts`` of the
    same shape (attention times bilinear weight, 0 for a corner off the map: exactly
    zero padding), or None when ``attn_t`` is None. All arithmetic runs on contiguous
    (R, heads, P) slices with scalar level sizes.
    """
    num_levels, _, r, m, num_points = loc_t.shape
    device = loc_t.device
    batch = torch.div(torch.arange(row0, row0 + r, device=device, dtype=torch.int32), q_total,
                      rounding_mode="floor")
    head = torch.arange(m, device=device, dtype=torch.int32)
    base = (batch * num_values).view(r, 1, 1) * m + head.view(1, m, 1)  # (R, heads, 1): row of s = 0
    col = torch.empty(r, m, num_levels, 4, num_points, device=device, dtype=torch.int32)
    wts = None if attn_t is None else torch.empty(col.shape, device=device, dtype=loc_t.dtype)
    for level, (h, w) in enumerate(shapes):
        (ix0, ix1, iy0, iy1), (wx0, wx1, wy0, wy1), _, _ = factors[level]
        row_y0 = (iy0 * w + starts[level]) * m + base
        row_y1 = (iy1 * w + starts[level]) * m + base
        ix0, ix1 = ix0 * m, ix1 * m
        for corner, (row, ix) in enumerate(((row_y0, ix0), (row_y0, ix1), (row_y1, ix0), (row_y1, ix1))):
            torch.add(row, ix, out=col[:, :, level, corner])
        if wts is not None:
            a = attn_t[level]
            ay0, ay1 = a * wy0, a * wy1
            for corner, (ay, wx) in enumerate(((ay0, wx0), (ay0, wx1), (ay1, wx0), (ay1, wx1))):
                torch.mul(ay, wx, out=wts[:, :, level, corner])
    return col, wts


def _factors(loc_t: Tensor, shapes: list[tuple[int, int]]) -> list:
    return [_level_factors(loc_t[level, 0], loc_t[level, 1], h, w) for level, (h, w) in enumerate(shapes)]


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _row_pointers(n_rows: int, per_row: int, device) -> Tensor:
    return torch.arange(0, n_rows * per_row + 1, per_row, device=device, dtype=torch.int32)


class _DeformAttnCSR(torch.autograd.Function):
    """Chunks of queries as CSR products ``out = A_chunk @ V``; the backward recomputes A."""

    @staticmethod
    def forward(ctx, value, loc, attn, shapes, chunk):
        b, s, m, dh = value.shape
        q = loc.shape[1]
        starts = _starts(shapes)
        # Detached, so that embedding_bag takes its forward-only path (no backward buffers).
        v_rows = value.detach().view(b * s * m, dh)  # row (b, s, head)
        loc_rows = loc.view(b * q, *loc.shape[2:])  # (B*Q, heads, L, P, 2)
        attn_rows = attn.view(b * q, *attn.shape[2:])
        out = value.new_empty(b * q * m, dh)  # row (b, q, head)
        for r0 in range(0, b * q, chunk):
            r1 = min(r0 + chunk, b * q)
            loc_t, attn_t = _chunk_layout(loc_rows[r0:r1], attn_rows[r0:r1])
            col, wts = _corners(loc_t, attn_t, _factors(loc_t, shapes), shapes, starts, s, q, r0)
            n_rows = (r1 - r0) * m
            # out rows = A @ V, each row a weighted bag of its L*4*P corner rows.
            out[r0 * m:r1 * m] = F.embedding_bag(col.view(n_rows, -1), v_rows, mode="sum",
                                                 per_sample_weights=wts.view(n_rows, -1))
        ctx.save_for_backward(value, loc, attn)
        ctx.shapes, ctx.chunk = shapes, chunk
        return out.view(b, q, m * dh)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        shapes, chunk = ctx.shapes, ctx.chunk
        b, s, m, dh = value.shape
        q, num_points = loc.shape[1], loc.shape[4]
        starts = _starts(shapes)
        n_values = b * s * m
        v_rows = value.view(n_values, dh)
        g_rows = grad_out.reshape(b * q * m, dh).contiguous()
        loc_rows = loc.view(b * q, *loc.shape[2:])
        attn_rows = attn.view(b * q, *attn.shape[2:])
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        # Value gradient rows are padded by one map row plus one pixel on both sides, so that a
        # sample's four corners are its top-left corner's row shifted by 0, 1, W, W+1 pixels.
        pad = (max(w for _, w in shapes) + 1) * m
        grad_full = value.new_zeros(n_values + 2 * pad, dh) if need_v else None
        grad_loc = torch.empty_like(loc_rows) if need_loc else None
        grad_attn = torch.empty_like(attn_rows) if need_attn else None
        head = torch.arange(m, device=value.device, dtype=torch.int32)
        for r0 in range(0, b * q, chunk):
            r1 = min(r0 + chunk, b * q)
            r = r1 - r0
            n_rows = r * m
            g = g_rows[r0 * m:r1 * m]  # (R*heads, Dh), row (b, q, head)
            loc_t, attn_t = _chunk_layout(loc_rows[r0:r1], attn_rows[r0:r1])
            factors = _factors(loc_t, shapes)
            batch = torch.div(torch.arange(r0, r1, device=value.device, dtype=torch.int32), q,
                              rounding_mode="floor")
            base = (batch * s).view(r, 1, 1) * m + head.view(1, m, 1)  # (R, heads, 1): row of s = 0
            b_first, b_last = r0 // q, (r1 - 1) // q
            pattern_rows = _row_pointers(n_rows, 4 * num_points, value.device)
            dots = []  # per level: (4 corners, R, heads, P) of <grad_out row, value row>
            for level, (h, w) in enumerate(shapes):
                _, (wx0, wx1, wy0, wy1), _, (x0, y0) = factors[level]
                # Row of each sample's top-left corner (it may sit one pixel off the map);
                # the other corners are this row shifted by 1, W and W+1 pixels.
                top_left = y0.clamp(-1, h - 1) * w + x0.clamp(-1, w - 1)  # (R, heads, P)
                key = (top_left.to(torch.int32) + starts[level]) * m + base
                shifts = (0, m, w * m, (w + 1) * m)
                shift_t = torch.tensor(shifts, dtype=torch.int32, device=value.device).view(4, 1)
                if need_v:
                    # dV += A.T @ g. A.T in CSR needs the samples sorted by the value row they
                    # read: one sort of the top-left rows serves all four corners, each
                    # accumulating into a row-shifted view of the padded gradient.
                    lo = (b_first * s + starts[level] - w - 1) * m  # rows this level can touch
                    n_keys = (b_last * s + starts[level] + h * w) * m - lo
                    sorted_key, order = torch.sort((key - lo).view(-1), stable=True)
                    crow_t = torch.zeros(n_keys + 1, dtype=torch.int32, device=key.device)
                    torch.cumsum(torch.bincount(sorted_key, minlength=n_keys), 0, out=crow_t[1:])
                    rows_t = torch.div(order, num_points, rounding_mode="floor").to(torch.int32)
                    a = attn_t[level]
                    for shift, wy, wx in zip(shifts, (wy0, wy0, wy1, wy1), (wx0, wx1, wx0, wx1)):
                        vals = (a * wy * wx).view(-1).index_select(0, order)
                        a_t = _csr(crow_t, rows_t, vals, (n_keys, n_rows))
                        start_row = pad + lo + shift
                        grad_full[start_row:start_row + n_keys].addmm_(a_t, g)
                    del sorted_key, order, crow_t, rows_t
                if need_loc or need_attn:
                    # One dot per sample and corner, on A's pattern (4*P entries per row, corner-major).
                    # Off-map corners read a clamped row; their dots are multiplied by 0 below.
                    col = (key.unsqueeze(-2) + shift_t).clamp_(0, n_values - 1).view(-1)  # (R, heads, 4, P)
                    pattern = _csr(pattern_rows, col, g.new_zeros(col.numel()), (n_rows, n_values))
                    level_dots = torch.sparse.sampled_addmm(pattern, g, v_rows.t(), beta=0.0).values()
                    dots.append(level_dots.view(r, m, 4, num_points).unbind(2))
            if not (need_loc or need_attn):
                continue
            g_attn = torch.empty_like(attn_t)  # (L, R, heads, P)
            g_loc = torch.empty_like(loc_t)  # (L, 2, R, heads, P)
            for level, (h, w) in enumerate(shapes):
                _, (wx0, wx1, wy0, wy1), (vx0, vx1, vy0, vy1), _ = factors[level]
                d00, d01, d10, d11 = dots[level]  # corners (y0x0, y0x1, y1x0, y1x1)
                along_x0 = d00 * wy0 + d10 * wy1  # summed over the y corners
                along_x1 = d01 * wy0 + d11 * wy1
                g_attn[level] = along_x0 * wx0 + along_x1 * wx1
                if need_loc:
                    # d w / d pixel = (-v0, +v1) per axis; d pixel / d loc = the level size.
                    a = attn_t[level]
                    along_y0 = d00 * wx0 + d01 * wx1
                    along_y1 = d10 * wx0 + d11 * wx1
                    g_loc[level, 0] = (along_x1 * vx1 - along_x0 * vx0) * a * w
                    g_loc[level, 1] = (along_y1 * vy1 - along_y0 * vy0) * a * h
            if need_attn:
                grad_attn[r0:r1] = g_attn.permute(1, 2, 0, 3)
            if need_loc:
                grad_loc[r0:r1] = g_loc.permute(2, 3, 0, 4, 1)
        grad_v = grad_full[pad:pad + n_values] if need_v else None
        grad_value = grad_v.view_as(value) if need_v else None
        grad_loc = grad_loc.view_as(loc) if need_loc else None
        grad_attn = grad_attn.view_as(attn) if need_attn else None
        return grad_value, grad_loc, grad_attn, None, None


def _starts(shapes: list[tuple[int, int]]) -> list[int]:
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return starts


def deform_attn(
    value: Tensor,
    spatial_shapes: LevelShapes | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    chunk_queries: int | None = None,
) -> Tensor:
    """Fast multi-scale deformable attention: bilinear corners as a sparse (CSR) product.

    For each query row ``(b, q, head)`` the L*P samples become L*P*4 stored entries
    (corner column, attention weight times bilinear weight; out-of-map corners get
    weight 0, which is exactly zero padding), and ``out = A @ V`` is a CSR
    sparse-times-dense product. Queries are processed ``chunk_queries`` rows of
    B*Q at a time (default: at least 2048, more for large value maps), so the
    sampled (B*heads, Dh, Q, L*P) tensor is never formed and the working set is
    bounded. The backward recomputes each chunk's entries: the value gradient is
    ``A.T @ grad`` (one sort per level of the samples' top-left corners gives A.T
    in CSR for all four corners) and the location / weight gradients come from
    sampled dense products (one dot per stored corner). Equal to
    :func:`deform_attn_reference` up to float rounding.

    Frames: as :func:`deform_attn_reference` (value rows are the flattened feature
    maps; queries are whatever the caller samples for, e.g. BEV cells).

    Shapes:
        value: (B, S, heads, Dh)   spatial_shapes: L pairs (H_l, W_l)
        sampling_locations: (B, Q, heads, L, P, 2) in [0, 1], (x, y)
        attention_weights: (B, Q, heads, L, P)   returns: (B, Q, heads * Dh)
    """
    shapes = _level_shapes(spatial_shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    b_, s_, m_, _ = value.shape
    if b_ * (s_ + 2 * max(w for _, w in shapes) + 2) * m_ >= 2**31 - 1:
        raise ValueError("deform_attn: B*S*heads too large for int32 indices")
    if chunk_queries is None:
        # Enough rows per chunk that the backward's passes over the touched value rows stay
        # small next to the chunk's own entries, and at least 2048.
        b, s, m, _ = value.shape
        entries_per_row = m * len(shapes) * sampling_locations.shape[4] * 4
        chunk_queries = max(2048, 4 * b * s * m // max(1, entries_per_row))
    return _DeformAttnCSR.apply(
        value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous(),
        shapes, max(1, int(chunk_queries)),
    )


def deform_attn_exportable(
    value: Tensor, spatial_shapes: LevelShapes | Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """ONNX-exportable deformable attention: gathers of bilinear corners, summed level by level.

    Uses only gather / arithmetic (no ``grid_sample``, no sparse tensors); the
    working set is one level's (B*heads, Q, P, Dh) corner gather at a time, never
    the stacked L*P samples. Same formulation, frames and shapes as :func:`deform_attn`.

    Shapes:
        value: (B, S, heads, Dh)   spatial_shapes: L pairs (H_l, W_l) (static)
        sampling_locations: (B, Q, heads, L, P, 2)   attention_weights: (B, Q, heads, L, P)
        returns: (B, Q, heads * Dh)
    """
    shapes = _level_shapes(spatial_shapes)
    b, s, m, dh = value.shape
    _, q, _, num_levels, num_points, _ = sampling_locations.shape
    v = value.permute(0, 2, 1, 3).reshape(b * m, s, dh)  # (B*heads, S, Dh)
    loc = sampling_locations.permute(0, 2, 1, 3, 4, 5).reshape(b * m, q, num_levels, num_points, 2)
    attn = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * m, q, num_levels, num_points)
    out = v.new_zeros(b * m, q, dh)
    start = 0
    for level, (h, w) in enumerate(shapes):
        px = loc[:, :, level, :, 0] * w - 0.5  # (B*heads, Q, P)
        py = loc[:, :, level, :, 1] * h - 0.5
        x0 = torch.floor(px)
        y0 = torch.floor(py)
        fx = px - x0
        fy = py - y0
        a = attn[:, :, level]
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            xi = x0 + dx
            yi = y0 + dy
            valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * a * valid.to(a.dtype)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long() + start  # (B*heads, Q, P)
            gathered = torch.gather(v, 1, idx.reshape(b * m, q * num_points, 1).expand(-1, -1, dh))
            out = out + (gathered.view(b * m, q, num_points, dh) * wgt.unsqueeze(-1)).sum(2)
        start += h * w
    return out.view(b, m, q, dh).permute(0, 2, 1, 3).reshape(b, q, m * dh)
