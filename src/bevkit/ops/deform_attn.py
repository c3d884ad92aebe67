"""Multi-scale deformable attention (Deformable DETR / BEVFormer) without a CUDA kernel."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import at_least_float32, full_precision
from .tracing import exporting

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


class _Levels:
    """Per-level constants laid out along the (level, point) axis of a chunk, so that every
    per-sample pass runs over contiguous (rows, L*P) tensors with no level loop and no broadcast
    over a short inner dimension (which PyTorch's CPU kernels run element by element)."""

    def __init__(self, shapes: list[tuple[int, int]], num_points: int, m: int, like: Tensor):
        def along(vals, dtype):
            return torch.tensor(vals, dtype=dtype, device=like.device).repeat_interleave(num_points)

        hs, ws = [h for h, _ in shapes], [w for _, w in shapes]
        starts = _starts(shapes)
        self.w = along(ws, like.dtype)
        self.h = along(hs, like.dtype)
        self.w_last = along([w - 1 for w in ws], like.dtype)
        self.h_last = along([h - 1 for h in hs], like.dtype)
        self.w_2nd = along([w - 2 for w in ws], like.dtype)
        self.h_2nd = along([h - 2 for h in hs], like.dtype)
        self.zero = torch.zeros_like(self.w)
        self.minus_one = torch.full_like(self.w, -1.0)
        self.one = torch.ones_like(self.w)
        self.minus_half = torch.full_like(self.w, -0.5)
        self.row_step = along([w * m for w in ws], torch.int32)  # value rows per map row
        self.start = along([st * m for st in starts], torch.int32)  # first value row of the level
        # Corner rows relative to the top-left corner: (y0x0, y0x1, y1x0, y1x1) -> (4, L*P).
        self.shifts = torch.stack([self.zero.to(torch.int32), torch.full_like(self.row_step, m),
                                   self.row_step, self.row_step + m])
        self.lp = len(shapes) * num_points
        self.m = m


def _axis(u: Tensor, size: Tensor, last: Tensor, second_last: Tensor, lv: _Levels):
    """Bilinear factors along one axis for normalised locations ``u`` (N, L*P), contiguous.

    Returns the floor pixel clamped to [-1, size - 1] as int32 (a sample off the map keeps a
    corner row next to it), the masked weights ``(w0, w1)`` of the corners ``i0`` and ``i0 + 1``
    (zero for a corner off the map: exactly zero padding) and the 0/1 masks ``(v0, v1)``.
    """
    p = torch.addcmul(lv.minus_half, u, size)  # pixel coordinate, align_corners=False
    fl = torch.floor(p)
    frac = p.sub_(fl)
    # On the map iff i * (last - i) >= 0 for the integer i; as 0/1 floats: clamp(that + 1, 0, 1).
    v0 = torch.addcmul(lv.one, fl, last - fl).clamp_(0, 1)
    fl1 = fl + 1
    v1 = torch.addcmul(lv.one, fl1, second_last - fl).clamp_(0, 1)
    w1 = frac * v1
    w0 = torch.addcmul(v0, frac, v0, value=-1)  # (1 - frac) * v0
    i0 = torch.clamp(fl, lv.minus_one, last).to(torch.int32)
    return i0, (w0, w1), (v0, v1)


def _entries(loc: Tensor, lv: _Levels, base: Tensor, n_values: int):
    """Bilinear corners of a chunk of N = R*heads query rows.

    ``loc`` (N, L*P, 2) are the rows' locations in their natural layout, ``base`` (N, 1) the
    value row of (b, s = 0, head) for each row, ``(b * S) * heads + head``. Returns the top-left
    row ``key`` (N, L*P) int32 (one pixel off the map at most), the corner rows ``col``
    (N, 4, L*P) int32 clamped into the value rows, and the x / y factors of :func:`_axis`.
    """
    xy = loc.permute(2, 0, 1).contiguous()  # (2, N, L*P)
    x0, wx, vx = _axis(xy[0], lv.w, lv.w_last, lv.w_2nd, lv)
    y0, wy, vy = _axis(xy[1], lv.h, lv.h_last, lv.h_2nd, lv)
    key = torch.addcmul(base + lv.start, y0, lv.row_step)
    key.add_(x0, alpha=lv.m)
    col = torch.add(key.unsqueeze(1), lv.shifts).clamp_(0, n_values - 1)
    return key, col, wx, wy, vx, vy


def _corner_weights(a: Tensor, wx: tuple[Tensor, Tensor], wy: tuple[Tensor, Tensor], out) -> None:
    """Attention times bilinear weight of the corners (y0x0, y0x1, y1x0, y1x1), written into the
    four (N, L*P) views ``out``. ``a``, ``wx``, ``wy``: (N, L*P), masked as from :func:`_axis`."""
    ay0, ay1 = wy[0] * a, wy[1] * a
    for view, ay, w in zip(out, (ay0, ay0, ay1, ay1), (wx[0], wx[1], wx[0], wx[1])):
        torch.mul(ay, w, out=view)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _row_pointers(n_rows: int, per_row: int, device) -> Tensor:
    return torch.arange(0, n_rows * per_row + 1, per_row, device=device, dtype=torch.int32)


def _row_bases(r0: int, r: int, q: int, s: int, m: int, device) -> Tensor:
    """``(b * S) * heads + head`` of the rows of flattened (b, q) rows r0 .. r0+R: (R*heads, 1) int32."""
    batch = torch.div(torch.arange(r0, r0 + r, device=device, dtype=torch.int32), q, rounding_mode="floor")
    head = torch.arange(m, device=device, dtype=torch.int32)
    return ((batch * s).view(r, 1) * m + head.view(1, m)).view(r * m, 1)


class _DeformAttnCSR(torch.autograd.Function):
    """Chunks of queries as sparse products ``out = A_chunk @ V``; the backward recomputes A."""

    @staticmethod
    def forward(ctx, value, loc, attn, shapes, chunk):
        b, s, m, dh = value.shape
        q, num_points = loc.shape[1], loc.shape[4]
        lv = _Levels(shapes, num_points, m, value)
        n_values = b * s * m
        # Detached, so that embedding_bag takes its forward-only path (no backward buffers).
        v_rows = value.detach().view(n_values, dh)  # row (b, s, head)
        loc_rows = loc.view(b * q * m, lv.lp, 2)  # row (b, q, head): natural layout
        attn_rows = attn.view(b * q * m, lv.lp)
        out = value.new_empty(b * q * m, dh)
        for r0 in range(0, b * q, chunk):
            r1 = min(r0 + chunk, b * q)
            n0, n1 = r0 * m, r1 * m
            base = _row_bases(r0, r1 - r0, q, s, m, value.device)
            _, col, (wx0, wx1), (wy0, wy1), _, _ = _entries(loc_rows[n0:n1], lv, base, n_values)
            wts = value.new_empty(n1 - n0, 4, lv.lp)
            _corner_weights(attn_rows[n0:n1], (wx0, wx1), (wy0, wy1), wts.unbind(1))
            # out rows = A @ V, each row a weighted bag of its 4*L*P corner rows.
            out[n0:n1] = F.embedding_bag(col.view(n1 - n0, -1), v_rows, mode="sum",
                                         per_sample_weights=wts.view(n1 - n0, -1))
        ctx.save_for_backward(value, loc, attn)
        ctx.shapes, ctx.chunk = shapes, chunk
        return out.view(b, q, m * dh)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        shapes, chunk = ctx.shapes, ctx.chunk
        b, s, m, dh = value.shape
        q, num_points = loc.shape[1], loc.shape[4]
        lv = _Levels(shapes, num_points, m, value)
        starts = _starts(shapes)
        n_values = b * s * m
        device = value.device
        v_rows = value.view(n_values, dh)
        g_rows = grad_out.reshape(b * q * m, dh).contiguous()
        loc_rows = loc.view(b * q * m, lv.lp, 2)
        attn_rows = attn.view(b * q * m, lv.lp)
        need_v, need_loc, need_attn = ctx.needs_input_grad[:3]
        # Value gradient rows are padded by one map row plus one pixel on both sides, so that a
        # sample's four corners are its top-left corner's row shifted by 0, 1, W and W+1 pixels
        # even when the top-left corner sits just off the map.
        pad = (max(w for _, w in shapes) + 1) * m
        grad_full = value.new_zeros(n_values + 2 * pad, dh) if need_v else None
        grad_loc = torch.empty_like(loc_rows) if need_loc else None
        grad_attn = torch.empty_like(attn_rows) if need_attn else None
        for r0 in range(0, b * q, chunk):
            r1 = min(r0 + chunk, b * q)
            n0, n1 = r0 * m, r1 * m
            n = n1 - n0
            g = g_rows[n0:n1]  # (N, Dh), row (b, q, head)
            base = _row_bases(r0, r1 - r0, q, s, m, device)
            key, col, (wx0, wx1), (wy0, wy1), (vx0, vx1), (vy0, vy1) = _entries(loc_rows[n0:n1], lv, base,
                                                                                  n_values)
            a = attn_rows[n0:n1]
            if need_v:
                # dV += A.T @ g. A.T in CSR needs the samples sorted by the value row they read:
                # one sort of the top-left rows of all levels (each level's rows moved into a
                # range of its own) serves every level and corner; each corner of a level then
                # accumulates into a row-shifted view of the padded gradient.
                b_first, b_last = r0 // q, (r1 - 1) // q
                lo, n_keys, offset = [], [], 0
                for level, (h, w) in enumerate(shapes):
                    lo.append((b_first * s + starts[level] - w - 1) * m)  # rows this level can touch
                    n_keys.append((b_last * s + starts[level] + h * w) * m - lo[-1])
                    offset += n_keys[-1]
                first = [sum(n_keys[:level]) for level in range(len(shapes))]
                shift_in = torch.tensor([f - l for f, l in zip(first, lo)], dtype=torch.int32, device=device)
                sorted_key, order = torch.sort((key + shift_in.repeat_interleave(num_points)).view(-1), stable=True)
                crow_t = torch.zeros(offset + 1, dtype=torch.int32, device=device)
                torch.cumsum(torch.bincount(sorted_key, minlength=offset), 0, out=crow_t[1:])
                rows_t = torch.div(order, lv.lp, rounding_mode="floor").to(torch.int32)
                wts = value.new_empty(4, n, lv.lp)  # corner-major, entry (row, level, point)
                _corner_weights(a, (wx0, wx1), (wy0, wy1), wts.unbind(0))
                vals = wts.view(4, -1).index_select(1, order)
                bounds = crow_t[first + [offset]].tolist()
                for level, (h, w) in enumerate(shapes):
                    e0, e1 = bounds[level], bounds[level + 1]
                    crow_l = crow_t[first[level]:first[level] + n_keys[level] + 1] - e0
                    for corner, shift in enumerate((0, m, w * m, (w + 1) * m)):
                        a_t = _csr(crow_l, rows_t[e0:e1], vals[corner, e0:e1], (n_keys[level], n))
                        start_row = pad + lo[level] + shift
                        grad_full[start_row:start_row + n_keys[level]].addmm_(a_t, g)
                del sorted_key, order, crow_t, rows_t, wts, vals
            if not (need_loc or need_attn):
                continue
            # One dot <grad_out row, value row> per stored corner, on A's own pattern.
            pattern = _csr(_row_pointers(n, 4 * lv.lp, device), col.view(-1), g.new_zeros(col.numel()),
                           (n, n_values))
            d = torch.sparse.sampled_addmm(pattern, g, v_rows.t(), beta=0.0).values().view(n, 2, 2, lv.lp)
            # u[:, cy] = the dots interpolated along x at each y corner (zero-padded corners carry
            # zero weight); d out / d attention interpolates them along y.
            u = d[:, :, 0] * wx0.unsqueeze(1)
            u.addcmul_(d[:, :, 1], wx1.unsqueeze(1))
            if need_attn:
                torch.mul(u[:, 0], wy0, out=grad_attn[n0:n1]).addcmul_(u[:, 1], wy1)
            if need_loc:
                # d weight / d pixel = (-v0, +v1) per axis; d pixel / d location = the level size.
                tx = d[:, :, 1] * vx1.unsqueeze(1)
                tx.addcmul_(d[:, :, 0], vx0.unsqueeze(1), value=-1)  # (N, 2, L*P)
                gx = tx[:, 0] * wy0
                gx.addcmul_(tx[:, 1], wy1).mul_(a)
                gy = u[:, 1] * vy1
                gy.addcmul_(u[:, 0], vy0, value=-1).mul_(a)
                torch.mul(gx, lv.w, out=grad_loc[n0:n1, :, 0])
                torch.mul(gy, lv.h, out=grad_loc[n0:n1, :, 1])
        grad_value = grad_full[pad:pad + n_values].view_as(value) if need_v else None
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
    weight 0, which is exactly zero padding), and ``out = A @ V`` is a sparse
    product, each row a weighted ``embedding_bag`` of its corner rows. Queries are
    processed ``chunk_queries`` rows of B*Q at a time (default: at least 2048, more
    for large value maps), so the sampled (B*heads, Dh, Q, L*P) tensor is never
    formed and the working set is bounded. Every per-sample pass runs on the
    inputs' natural (rows, L*P) layout, all levels at once. The backward recomputes
    each chunk's entries: the value gradient is ``A.T @ grad`` (one sort of the
    samples' top-left corners gives A.T in CSR for every level and all four
    corners) and the location / weight gradients come from one sampled dense
    product (one dot per stored corner). Equal to :func:`deform_attn_reference` up
    to float rounding. Under ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``) it
    runs :func:`deform_attn_exportable`, the same maths with fixed-size gathers.

    Frames: as :func:`deform_attn_reference` (value rows are the flattened feature
    maps; queries are whatever the caller samples for, e.g. BEV cells).

    Shapes:
        value: (B, S, heads, Dh)   spatial_shapes: L pairs (H_l, W_l)
        sampling_locations: (B, Q, heads, L, P, 2) in [0, 1], (x, y)
        attention_weights: (B, Q, heads, L, P)   returns: (B, Q, heads * Dh)
    """
    if exporting():  # the sparse product has data-dependent sizes: export the gather formulation
        return deform_attn_exportable(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = _level_shapes(spatial_shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    b_, s_, m_, _ = value.shape
    if b_ * (s_ + 2 * max(w for _, w in shapes) + 2) * m_ >= 2**31 - 1:
        raise ValueError("deform_attn: B*S*heads too large for int32 indices")
    if chunk_queries is None:
        # Enough rows per chunk that the backward's passes over the touched value rows stay
        # small next to the chunk's own entries, and at least 2048; aligned to the batch
        # elements (equal parts of one element's queries, or whole elements), so that a
        # chunk's rows read one element's value rows rather than straddle two.
        b, s, m, _ = value.shape
        q = sampling_locations.shape[1]
        entries_per_row = m * len(shapes) * sampling_locations.shape[4] * 4
        target = max(2048, 4 * b * s * m // max(1, entries_per_row))
        if q >= target:
            chunk_queries = -(-q // -(-q // target))  # ceil(q / parts), parts = ceil(q / target)
        else:
            chunk_queries = q * max(1, target // max(1, q))
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in (value, sampling_locations, attention_weights)):
        # Half precision: locations must not be rounded to a few pixels of a large map (bf16 keeps 8 bits),
        # and the sparse products have no half kernel on the CPU. Computed in float32, returned as value.
        with full_precision(value):
            return deform_attn(value.float(), shapes, sampling_locations.float(), attention_weights.float(),
                               chunk_queries).to(value.dtype)
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
    # Positions and bilinear weights in float32 at least: half floats round the pixel coordinates.
    loc = at_least_float32(sampling_locations)
    pos_dtype = loc.dtype
    loc = loc.permute(0, 2, 1, 3, 4, 5).reshape(b * m, q, num_levels, num_points, 2)
    attn = attention_weights.to(pos_dtype).permute(0, 2, 1, 3, 4).reshape(b * m, q, num_levels, num_points)
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
            wgt = ((fx if dx else 1 - fx) * (fy if dy else 1 - fy) * a * valid.to(a.dtype)).to(v.dtype)
            idx = yi.clamp(0, h - 1).long() * w + xi.clamp(0, w - 1).long() + start  # (B*heads, Q, P)
            gathered = torch.gather(v, 1, idx.reshape(b * m, q * num_points, 1).expand(-1, -1, dh))
            out = out + (gathered.view(b * m, q, num_points, dh) * wgt.unsqueeze(-1)).sum(2)
        start += h * w
    return out.view(b, m, q, dh).permute(0, 2, 1, 3).reshape(b, q, m * dh)
