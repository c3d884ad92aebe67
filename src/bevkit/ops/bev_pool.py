"""Lift-splat BEV pooling: depth-weighted camera features summed into BEV cells."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .tracing import exporting

__all__ = [
    "BEVGridSpec",
    "BEVPoolPlan",
    "bev_cell_index",
    "bev_pool_plan",
    "bev_pool",
    "bev_pool_reference",
    "bev_pool_cumsum",
    "bev_pool_exportable",
]


@dataclass(frozen=True)
class BEVGridSpec:
    """Bounds and resolution of a BEV grid in the ego frame (metres).

    Each bound is ``(min, max, step)``. Cell ``(iy, ix)`` is centred at
    ``(xmin + (ix + 0.5) * dx, ymin + (iy + 0.5) * dy)``; a point belongs to cell
    ``ix = floor((x - xmin) / dx)`` when ``0 <= ix < X`` (the same for y and z).
    The z range is collapsed: every point with ``zmin <= z < zmax`` is pooled
    into its (iy, ix) column. BEV tensors are laid out ``(B, C, Y, X)`` with X
    along ego forward and Y along ego left.
    """

    xbound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    ybound: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    zbound: tuple[float, float, float] = (-5.0, 3.0, 8.0)

    @staticmethod
    def _cells(bound: tuple[float, float, float]) -> int:
        lo, hi, step = bound
        return int(round((hi - lo) / step))

    @property
    def nx(self) -> int:
        return self._cells(self.xbound)

    @property
    def ny(self) -> int:
        return self._cells(self.ybound)

    @property
    def nz(self) -> int:
        return self._cells(self.zbound)


@dataclass(frozen=True)
class BEVPoolPlan:
    """Reusable layout of the frustum-to-BEV pooling: runs of points that share a BEV cell.

    The pooling is ``bev[b, :, cell] = sum_{n,d,h,w in cell} depth[b,n,d,h,w] * feats[b,n,:,h,w]``.
    Only which cell each frustum point falls in depends on geometry, so the layout is
    built once per calibration (or once per augmentation step) and reused.

    Frustum points are enumerated in *column order*, ``(b, n, d, w, h)`` with h fastest:
    the points of one image column at one depth bin stand above one another in the ego
    frame for a roughly level camera, so consecutive points mostly share a cell. The
    plan cuts this sequence into *runs*: a run starts at each point inside the grid whose
    cell differs from the previous point's (and at a sample's first point when it is
    inside), and also holds the points outside the grid that follow it (they read a zero
    feature row, so they add nothing). The pooling is
    then one weighted sum per run, added into the run's cell; runs are taken a chunk at a
    time, so their sums never take more than a few MiB. Runs are exact for any geometry;
    only their length, and so the speed, depends on it (about 10 points per run on the
    nuScenes rig at BEVDet-R50 size).

    Fields (P = B*N*D*H*W frustum points, R runs, Z = B*N*H*W, the zero feature row):
        col (P,) int32: feature row of each point, pixel ``(b*N + n)*H*W + h*W + w``, or Z
            for points outside the grid.
        starts (R + 1,) int32: the first point of each run (0 for the first run), then P.
        run_row (R,) int64: BEV row of each run.
        chunks: ``(r0, r1, p0, p1)`` per chunk of runs: runs ``[r0, r1)`` hold points ``[p0, p1)``.
        shape: ``(B, N, D, H, W)`` of the depth tensor the plan was built for.
        grid_shape: ``(Y, X)``.
    """

    col: Tensor
    starts: Tensor
    run_row: Tensor
    chunks: tuple[tuple[int, int, int, int], ...]
    shape: tuple[int, int, int, int, int]
    grid_shape: tuple[int, int]

    @property
    def num_entries(self) -> int:
        """K, the number of frustum points inside the grid."""
        b, n, _, h, w = self.shape
        return int((self.col != b * n * h * w).sum())

    @property
    def num_runs(self) -> int:
        """R, the number of runs (one or more per cell that any point falls in)."""
        return int(self.run_row.numel())


def bev_cell_index(points_ego: Tensor, grid: BEVGridSpec) -> Tensor:
    """Flat BEV cell index ``iy * X + ix`` of every frustum point, or -1 outside the grid.

    Frames: ``points_ego`` are frustum points in the ego frame (x forward, y left, z up).

    Shapes:
        points_ego: (B, N, D, H, W, 3)   returns: (B, N, D, H, W) int64
    """
    return _flat_cells(points_ego, grid).long()


_RUNS_PER_CHUNK = 4096  # run sums in flight: 4096 rows of C channels (1.25 MiB at C = 80)
_POINTS_PER_PASS = 1 << 18  # cell keys are computed for whole cameras, at most about this many points at a time


_CACHED_ELEMENTS = 1 << 20  # constants larger than this (4 MiB of int32) are made per call


def _tracing() -> bool:
    """Whether tensors made now may be symbolic or bound to a trace: while compiling, exporting,
    under any dispatch mode (fake tensors, ``make_fx``, FLOP counters), or capturing a CUDA graph."""
    return (torch.compiler.is_compiling() or exporting()
            or torch._C._len_torch_dispatch_stack() > 0
            or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()))


def _cached(build):
    """``build`` memoised per argument tuple, for the small constant tensors of the plan: made with
    autograd and inference mode off, shared, never written to, at most four kept per builder
    (``cache_clear()`` frees them). While tracing (see ``_tracing``), with unhashable (symbolic)
    arguments, or for results over ``_CACHED_ELEMENTS`` elements, tensors are made fresh."""
    memo = functools.lru_cache(maxsize=4)(build)

    @functools.wraps(build)
    def get(*args, elements: int = 0):
        if elements > _CACHED_ELEMENTS or _tracing():
            return build(*args)
        try:
            hash(args)
        except TypeError:
            return build(*args)
        with torch.inference_mode(False), torch.no_grad():
            return memo(*args)

    get.cache_clear = memo.cache_clear
    return get


def _cell_table(grid: BEVGridSpec, samples: int, device) -> Tensor:
    """Flat ``(samples, 3, Y + 2, X + 2)`` int32 lookup: ``k*Y*X + iy*X + ix`` inside, -1 on the border.

    Position ``(k, iz + 1, iy + 1, ix + 1)`` answers sample k's point with clamped indices
    ``iz in {-1, 0, 1}``, ``iy in [-1, Y]``, ``ix in [-1, X]``. Kept per grid size, batch size
    and device when it has at most ``_CACHED_ELEMENTS`` entries (0.8 MiB for four samples of
    128 x 128).
    """
    size = samples * 3 * (grid.ny + 2) * (grid.nx + 2)
    if size >= 2**31:
        raise ValueError("BEV grid too large for int32 cell indices")
    device = torch.device(device)
    if device.index is None and device.type != "cpu":  # one key per physical device
        device = torch.empty(0, device=device).device
    return _cell_table_of(grid.ny, grid.nx, samples, device, elements=size)


@_cached
def _cell_table_of(ny: int, nx: int, samples: int, device: torch.device) -> Tensor:
    table = torch.full((samples, 3, ny + 2, nx + 2), -1, dtype=torch.int32, device=device)
    cells = torch.arange(samples * ny * nx, dtype=torch.int32, device=device)
    table[:, 1, 1:-1, 1:-1] = cells.view(samples, ny, nx)
    return table.view(-1)


@_cached
def _binning_rows(grid_key: tuple, inner: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Per-axis binning constants tiled along rows of ``inner`` interleaved (x, y, z) points:
    lower bounds, steps, and the clamp range ``[-1, size]``, each ``(3 * inner,)``."""
    lows, steps, sizes = grid_key

    def tiled(values):
        return torch.tensor(values, dtype=dtype, device=device).repeat(inner)

    return tiled(lows), tiled(steps), tiled([-1.0] * 3), tiled(sizes)


def _flat_cells(points_ego: Tensor, grid: BEVGridSpec, sample: int = 0, table: Tensor | None = None) -> Tensor:
    """int32 ``sample * Y * X + iy * X + ix`` (or -1 outside the grid) element-wise over any leading shape.

    A point is in cell ``floor((p - lo) / step)`` per axis (the documented binning, bit for
    bit). All three axes are binned in one pass each over the interleaved ``(..., 3)``
    coordinates, with per-axis constants tiled along a long inner row. Each index is
    clamped to ``[-1, size]`` (the z index is then divided by the z size, so every axis
    ends in ``{-1, inside, size}`` with three z layers); the three are folded into one
    position of :func:`_cell_table`, which is read once per point. NaN coordinates read -1.
    ``table`` is ``_cell_table(grid, samples)`` for any ``samples > sample`` (built if None).
    """
    if (sample + 1) * grid.ny * grid.nx >= 2**31:
        raise ValueError("BEV grid too large for int32 cell indices")
    points_ego = points_ego.detach()  # cell indices have no gradient
    if points_ego.dtype in (torch.float16, torch.bfloat16):
        # Binned in float32: half floats hold too few integers for the clamp bounds (a grid
        # side past 256 cells in bfloat16) and the table positions.
        points_ego = points_ego.float()
    lead = points_ego.shape[:-1]
    dtype, device = points_ego.dtype, points_ego.device
    if points_ego.numel() == 0:
        return torch.empty(lead, dtype=torch.int32, device=device)
    if table is None:
        table = _cell_table(grid, sample + 1, device)
    inner = lead[-1] * (lead[-2] if len(lead) > 1 else 1) if lead else 1  # points per tiled row
    bounds = (grid.xbound, grid.ybound, grid.zbound)
    grid_key = (tuple(float(b[0]) for b in bounds), tuple(float(b[2]) for b in bounds), (grid.nx, grid.ny, grid.nz))
    lows, steps, floor_at, ceil_at = _binning_rows(grid_key, inner, dtype, device, elements=12 * inner)
    scaled = torch.sub(points_ego.reshape(-1, 3 * inner), lows)
    scaled.div_(steps)
    index = torch.clamp(scaled, floor_at, ceil_at, out=scaled).floor_().view(-1, 3)  # NaN stays NaN
    del scaled
    wide_x, wide_y = grid.nx + 2, grid.ny + 2
    iz = index[:, 2]
    if grid.nz > 1:  # [0, nz) -> 0, nz -> 1, -1 -> -1: exact for these small integers
        iz.div_(grid.nz).floor_()
    # Position in the table; the +1 border shift of the three axes (and the sample's block, while
    # the positions stay exact integers in the points' float type) are one constant.
    block = 3 * wide_x * wide_y
    exact = 2**53 if index.dtype == torch.float64 else 2**24
    if block >= exact:  # a huge grid: positions in float64
        index = index.double()
        iz = index[:, 2]
    fold = sample if (sample + 1) * block < exact else 0
    pos = torch.add(index[:, 0], index[:, 1], alpha=wide_x).add_(iz, alpha=wide_x * wide_y)
    pos.add_((1 + 3 * fold) * wide_x * wide_y + wide_x + 1).nan_to_num_(nan=0.0)  # NaN -> a border entry
    del index, iz
    pos = pos.to(torch.int32)
    if sample != fold:
        pos.add_(sample * block)
    return table.index_select(0, pos).view(lead)


def bev_pool_plan(points_ego: Tensor, grid: BEVGridSpec) -> BEVPoolPlan:
    """Build the run layout of the pooling from frustum points in the ego frame.

    Cost: the cell keys (a few element-wise passes over the points, one batch sample at
    a time so the temporaries stay one sample's size), one pass marking where runs
    start, and a few passes over the runs. No sort. Reuse the plan while the geometry is
    unchanged.

    Frames: ``points_ego`` are frustum points in the ego frame; rows of the plan are
    BEV cells of ``grid`` (cell ``(iy, ix)``, X along ego forward).

    Shapes:
        points_ego: (B, N, D, H, W, 3)   returns: plan for depth (B, N, D, H, W)
    """
    if points_ego.dim() != 6 or points_ego.shape[-1] != 3:
        raise ValueError(f"points_ego must be (B, N, D, H, W, 3), got {tuple(points_ego.shape)}")
    b, n, d, h, w, _ = points_ego.shape
    ny, nx = grid.ny, grid.nx
    cells = ny * nx
    num_rows = b * cells
    num_points = b * n * d * h * w
    num_pix = b * n * h * w
    if max(num_points, num_rows + 1) >= 2**31 - 1:
        raise ValueError("bev_pool_plan: problem too large for int32 indices")
    device = points_ego.device
    per_sample = n * d * w * h
    table = _cell_table(grid, b, device)
    col = torch.empty(b, n, d, w, h, dtype=torch.int32, device=device)
    pixel = torch.arange(n * h * w, dtype=torch.int32, device=device).view(n, 1, h, w).transpose(-1, -2)
    heads, run_rows = [], []
    group = max(1, min(n, _POINTS_PER_PASS // max(d * w * h, 1)))  # cameras per key pass
    keys = torch.empty(n, d, w, h, dtype=torch.int32, device=device)  # one sample's, reused
    for k in range(b):
        # Keys in column order, a few cameras at a time so that the temporaries stay small.
        for c0 in range(0, n, group):
            keys[c0:c0 + group] = _flat_cells(points_ego[k, c0:c0 + group], grid, k, table).transpose(-1, -2)
        key = keys.view(-1)
        inside = key >= 0
        # A run starts where the key changes to a cell, and at a sample's first point when it is
        # inside (its key differs from every key of the sample before).
        head = torch.empty_like(inside)
        torch.ne(key[1:], key[:-1], out=head[1:])
        head[:1] = True
        head = head.logical_and_(inside).nonzero().view(-1)
        run_rows.append(key.index_select(0, head))
        heads.append(head.add_(k * per_sample) if k else head)
        # Feature row (pixel (b*N + n)*H*W + h*W + w) of each point; Z for points outside.
        torch.where(inside.view(n, d, w, h), pixel.add(k * n * h * w) if k else pixel, pixel.new_tensor(num_pix),
                    out=col[k])
        del key, inside
    if b == 1:
        head, run_row = heads[0], run_rows[0].long()
    else:
        none = torch.zeros(0, dtype=torch.int64, device=device)
        head = torch.cat(heads) if heads else none
        run_row = torch.cat(run_rows).long() if run_rows else none
    num_runs = head.numel()
    starts = torch.empty(num_runs + 1, dtype=torch.int32, device=device)
    starts[:num_runs] = head
    starts[num_runs:] = num_points
    if num_runs:
        starts[:1] = 0  # the first run also holds the points outside the grid before it
    edges = list(range(0, num_runs, _RUNS_PER_CHUNK)) + [num_runs]
    firsts = starts[edges].tolist()
    chunks = tuple((r0, r1, p0, p1) for r0, r1, p0, p1 in zip(edges[:-1], edges[1:], firsts[:-1], firsts[1:]))
    return BEVPoolPlan(col=col.view(-1), starts=starts, run_row=run_row, chunks=chunks,
                       shape=(b, n, d, h, w), grid_shape=(ny, nx))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CSR support is in beta" / invariant-check notices
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _bag_sums(offsets: Tensor, index: Tensor, weights: Tensor, rows: Tensor) -> Tensor:
    """Weighted sums of row bags: ``out[i] = sum_{j in [offsets[i], offsets[i+1])} weights[j] * rows[index[j]]``.

    One ``embedding_bag`` call (fused gather and weighted sum, on CPU and CUDA alike).

    Shapes:
        offsets: (G + 1,)   index, weights: (E,)   rows: (M, C)   returns: (G, C)
    """
    return torch.nn.functional.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weights,
                                             include_last_offset=True)


class _BEVPoolRuns(torch.autograd.Function):
    """Forward: run sums added into their cells. Backward: the transposed product and sampled dots.

    With the pooling written ``out = A @ F`` (``F`` the feature rows, ``A`` sparse with one
    entry per point inside the grid), ``dF = A.T @ dout`` is a bag sum per pixel over its D
    points, each reading its run's cell gradient, and ``d depth`` of a point is that
    gradient dotted with its pixel's feature row (``torch.sparse.sampled_addmm`` on a
    compressed-row pattern with one row per pixel and its D runs as sorted columns).
    """

    @staticmethod
    def forward(ctx, depth, feats, plan, num_rows):
        b, n, d, h, w = plan.shape
        c = feats.shape[2]
        num_pix = b * n * h * w
        # Feature rows: one per pixel (b, n, h, w), then a zero row for the points outside the grid.
        rows = feats.new_empty(num_pix + 1, c)
        rows[:num_pix].view(b, n, h, w, c).copy_(feats.detach().permute(0, 1, 3, 4, 2))
        rows[num_pix].zero_()
        depth_c = depth.detach().transpose(-1, -2).reshape(-1)  # (P,) column order
        ctx.save_for_backward(depth_c, rows)
        ctx.plan = plan
        out = feats.new_zeros(num_rows, c)
        for r0, r1, p0, p1 in plan.chunks:
            offsets = plan.starts[r0:r1 + 1] - p0
            runs = _bag_sums(offsets, plan.col[p0:p1], depth_c[p0:p1], rows)  # (r1 - r0, C)
            out.index_add_(0, plan.run_row[r0:r1], runs)
            del runs  # before the next chunk's, so that one buffer is reused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        depth_c, rows = ctx.saved_tensors
        plan = ctx.plan
        b, n, d, h, w = plan.shape
        num_pix, c = rows.shape[0] - 1, rows.shape[1]
        need_depth, need_feats = ctx.needs_input_grad[:2]
        if not plan.chunks:  # no point inside the grid
            return (depth_c.new_zeros(b, n, d, h, w) if need_depth else None,
                    rows.new_zeros(b, n, c, h, w) if need_feats else None, None, None)
        # Every point reads its run's cell gradient. Number the runs along the points (column
        # order), then list the points pixel-major: D per pixel, whose runs never decrease.
        num_points, num_runs = plan.col.numel(), plan.run_row.numel()
        run_of = torch.zeros(num_points, dtype=torch.int32, device=depth_c.device)
        run_of[plan.starts[1:num_runs].long()] = 1
        by_pixel = run_of.cumsum_(0).view(b * n, d, w, h).permute(0, 3, 2, 1).reshape(-1)  # (P,) (b, n, h, w, d)
        del run_of
        inside = plan.col.view(b * n, d, w, h).permute(0, 3, 2, 1).reshape(-1) != num_pix
        grad_runs = grad_out.contiguous().index_select(0, plan.run_row)  # (R, C)
        bags = torch.arange(0, num_points + 1, d, dtype=torch.int32, device=depth_c.device)  # D per pixel
        grad_depth = grad_feats = None
        if need_depth:
            # d depth of a point = its pixel's feature row . its run's gradient: dout @ F.T sampled on a
            # pattern whose rows are the pixels (sorted columns); points outside the grid get 0.
            if num_runs < d:  # sampled_addmm wants nnz <= rows * cols: pad with zero runs
                grad_runs = torch.cat((grad_runs, grad_runs.new_zeros(d - num_runs, c)))
            pattern = _csr(bags, by_pixel, rows.new_zeros(num_points), (num_pix, grad_runs.shape[0]))
            dots = torch.sparse.sampled_addmm(pattern, rows[:num_pix], grad_runs.t(), beta=0.0).values()
            del pattern
            grad_depth = torch.where(inside, dots, 0.0).view(b, n, h, w, d).permute(0, 1, 4, 2, 3).contiguous()
            del dots
            grad_runs = grad_runs[:num_runs]
        if need_feats:
            # dF = A.T @ dout: one bag per pixel over its D points, points outside the grid weighted 0.
            depth_px = depth_c.view(b * n, d, w, h).permute(0, 3, 2, 1).reshape(-1)
            weights = torch.where(inside, depth_px, 0.0)  # out of place: depth_px may view the caller's depth
            grad_rows = _bag_sums(bags, by_pixel, weights, grad_runs)  # (B*N*H*W, C)
            grad_feats = grad_rows.view(b, n, h, w, c).permute(0, 1, 4, 2, 3)  # channels-last memory
        return grad_depth, grad_feats, None, None


def bev_pool(depth: Tensor, feats: Tensor, plan: BEVPoolPlan) -> Tensor:
    """Fast lift-splat pooling: weighted sums over runs of points that share a BEV cell.

    Never materialises the (B, N, D, H, W, C) frustum: per chunk of runs, one weighted
    ``embedding_bag`` sums each run's feature rows with its depth probabilities (about a
    tenth as many run sums as points), and one ``index_add_`` adds the sums into their
    cells. Differentiable in ``depth`` and ``feats``. A point outside the grid multiplies
    its depth by a zero feature row, so a non-finite depth there (which the reference
    ignores) turns its run's cell into NaN.

    Frames: features live on image pixels of each camera; the output is on the
    BEV grid of the plan (cell ``(iy, ix)``, X along ego forward, Y along ego left).
    The result is returned in channels-last memory (a permuted view of the product,
    no copy); call ``.contiguous()`` if a consumer needs the default layout.

    Shapes:
        depth: (B, N, D, H, W)   feats: (B, N, C, H, W)   returns: (B, C, Y, X)
    """
    b, n, d, h, w = _check(depth, feats, plan.shape)
    if depth.dtype != feats.dtype:
        raise ValueError(f"depth and feats must have the same dtype, got {depth.dtype} and {feats.dtype}")
    c = feats.shape[2]
    ny, nx = plan.grid_shape
    out = _BEVPoolRuns.apply(depth, feats, plan, b * ny * nx)  # (B*Y*X, C)
    return out.view(b, ny, nx, c).permute(0, 3, 1, 2)  # channels-last memory, no copy


def _check(depth: Tensor, feats: Tensor, shape: tuple[int, ...] | None = None):
    if depth.dim() != 5 or feats.dim() != 5:
        raise ValueError("depth must be (B, N, D, H, W) and feats (B, N, C, H, W)")
    b, n, d, h, w = depth.shape
    if feats.shape[:2] != (b, n) or feats.shape[3:] != (h, w):
        raise ValueError(f"feats {tuple(feats.shape)} does not match depth {tuple(depth.shape)}")
    if shape is not None and tuple(depth.shape) != tuple(shape):
        raise ValueError(f"plan was built for depth {tuple(shape)}, got {tuple(depth.shape)}")
    return b, n, d, h, w


def bev_pool_reference(depth: Tensor, feats: Tensor, points_ego: Tensor, grid: BEVGridSpec) -> Tensor:
    """Reference: materialise the frustum, then ``index_add`` it into the BEV cells.

    Frames: ``points_ego`` in the ego frame; output on ``grid``.

    Shapes:
        depth: (B, N, D, H, W)   feats: (B, N, C, H, W)   points_ego: (B, N, D, H, W, 3)
        returns: (B, C, Y, X)
    """
    b = depth.shape[0]
    c = feats.shape[2]
    rows, values = _materialise(depth, feats, points_ego, grid)
    out = values.new_zeros(b * grid.ny * grid.nx, c)
    out.index_add_(0, rows, values)
    return out.view(b, grid.ny, grid.nx, c).permute(0, 3, 1, 2).contiguous()


def _materialise(depth: Tensor, feats: Tensor, points_ego: Tensor, grid: BEVGridSpec):
    """The baselines' first step: the full frustum, and the flat BEV cell of each point in the grid.

    Shapes:
        returns: cells (K,) int64 over B*Y*X, values (K, C), K = points inside the grid
    """
    b = _check(depth, feats)[0]
    frustum = depth.unsqueeze(-1) * feats.permute(0, 1, 3, 4, 2).unsqueeze(2)  # (B,N,D,H,W,C)
    cell = bev_cell_index(points_ego, grid)  # (B, N, D, H, W)
    batch = torch.arange(b, device=depth.device).view(b, 1, 1, 1, 1)
    keep = cell >= 0
    return (batch * (grid.ny * grid.nx) + cell)[keep], frustum[keep]


class _CumsumPool(torch.autograd.Function):
    """The LSS "cumsum trick": sum runs of rank-sorted rows by differencing a prefix sum."""

    @staticmethod
    def forward(ctx, rows: Tensor, ranks: Tensor):
        rows = rows.cumsum(0)
        last = torch.ones(rows.shape[0], device=rows.device, dtype=torch.bool)
        last[:-1] = ranks[1:] != ranks[:-1]
        rows, ranks = rows[last], ranks[last]
        rows = torch.cat((rows[:1], rows[1:] - rows[:-1]))
        ctx.save_for_backward(last.cumsum(0) - last.long())  # run of each row
        return rows, ranks

    @staticmethod
    def backward(ctx, grad_rows, grad_ranks):
        (back,) = ctx.saved_tensors
        return grad_rows[back], None


def bev_pool_cumsum(depth: Tensor, feats: Tensor, points_ego: Tensor, grid: BEVGridSpec) -> Tensor:
    """Baseline: the lift-splat-shoot cumsum trick (materialise, sort by cell, prefix-sum).

    Kept as the benchmark baseline the issue names; numerically it subtracts
    large prefix sums, so it is less accurate than the other paths.

    Shapes:
        depth: (B, N, D, H, W)   feats: (B, N, C, H, W)   points_ego: (B, N, D, H, W, 3)
        returns: (B, C, Y, X)
    """
    b = depth.shape[0]
    c = feats.shape[2]
    ranks, rows = _materialise(depth, feats, points_ego, grid)
    order = ranks.argsort()
    rows, ranks = rows[order], ranks[order]
    out = rows.new_zeros(b * grid.ny * grid.nx, c)
    rows, ranks = _CumsumPool.apply(rows, ranks)
    out[ranks] = rows
    return out.view(b, grid.ny, grid.nx, c).permute(0, 3, 1, 2).contiguous()


def bev_pool_exportable(depth: Tensor, feats: Tensor, cell_index: Tensor, grid: BEVGridSpec) -> Tensor:
    """ONNX-exportable pooling: one scatter-add per depth bin, no frustum tensor.

    ``cell_index`` comes from :func:`bev_cell_index` (-1 outside the grid) and is
    a graph input, so a fixed calibration is precomputed once outside the graph.
    Peak extra memory is one (B*N*H*W, C) slice per depth bin.

    Shapes:
        depth: (B, N, D, H, W)   feats: (B, N, C, H, W)   cell_index: (B, N, D, H, W) int64
        returns: (B, C, Y, X)
    """
    b, n, d, h, w = depth.shape
    c = feats.shape[2]
    ny, nx = grid.ny, grid.nx
    cells = ny * nx
    feat_rows = feats.permute(0, 1, 3, 4, 2).reshape(b, n * h * w, c)  # (B, N*H*W, C)
    # Outside points go to a spare row per batch, dropped at the end.
    index = torch.where(cell_index >= 0, cell_index, torch.full_like(cell_index, cells))
    index = index.permute(0, 2, 1, 3, 4).reshape(b, d, n * h * w, 1).expand(b, d, n * h * w, c)
    weights = depth.permute(0, 2, 1, 3, 4).reshape(b, d, n * h * w, 1)
    out = feat_rows.new_zeros(b, cells + 1, c)
    for k in range(d):
        out.scatter_add_(1, index[:, k], weights[:, k] * feat_rows)
    return out[:, :cells].reshape(b, ny, nx, c).permute(0, 3, 1, 2)
