import importlib

import pytest
import torch

from bevkit.ops import (
    BEVGridSpec,
    bev_cell_index,
    bev_pool,
    bev_pool_cumsum,
    bev_pool_exportable,
    bev_pool_plan,
    bev_pool_reference,
)

GRID = BEVGridSpec(xbound=(-51.2, 51.2, 3.2), ybound=(-51.2, 51.2, 3.2), zbound=(-5.0, 3.0, 8.0))
SMALL = BEVGridSpec(xbound=(-4.0, 4.0, 1.0), ybound=(-3.0, 3.0, 0.5), zbound=(-2.0, 2.0, 4.0))


def _inputs(b, n, d, h, w, c, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    depth = torch.rand(b, n, d, h, w, generator=gen, dtype=dtype).softmax(2)
    feats = torch.randn(b, n, c, h, w, generator=gen, dtype=dtype)
    return depth, feats


def _random_points(b, n, d, h, w, spread=5.0, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, d, h, w, 3, generator=gen, dtype=torch.float64) * spread).to(dtype)


def _cases(frustum):
    real = frustum(depth_bins=10, feat_hw=(6, 16)).float()  # (6, D, H, W, 3)
    one_cam = frustum(cameras=("CAM_BACK",), depth_bins=10, feat_hw=(6, 16)).float()
    return {
        "random_b1": (_random_points(1, 2, 5, 4, 6), SMALL),
        "random_b3": (_random_points(3, 2, 5, 4, 6), SMALL),
        "rig_b1": (real.unsqueeze(0), GRID),
        "rig_b2": (torch.stack((real, real.flip(2))), GRID),  # second sample: rows swapped
        "single_camera": (one_cam.unsqueeze(0).expand(2, -1, -1, -1, -1, -1), GRID),
        "all_outside": (_random_points(2, 2, 5, 4, 6) + 100.0, SMALL),
        "empty": (torch.zeros(2, 0, 5, 4, 6, 3), SMALL),
    }


CASES = ["random_b1", "random_b3", "rig_b1", "rig_b2", "single_camera", "all_outside", "empty"]


def test_cell_index_hand_computed():
    # Cell (iy, ix) covers [xmin + ix dx, xmin + (ix+1) dx): the lower edge is in, the upper is out.
    pts = torch.tensor([
        [-4.0, -3.0, 0.0],   # lower corner -> (0, 0)
        [3.99, 2.99, 0.0],   # upper corner -> (11, 7)
        [4.0, 0.0, 0.0],     # x == xmax -> outside
        [0.5, 0.25, 1.9],    # -> ix 4, iy 6
        [0.5, 0.25, 2.0],    # z == zmax -> outside
        [0.5, 0.25, -2.1],   # below zmin -> outside
    ]).view(1, 1, 6, 1, 1, 3)
    got = bev_cell_index(pts, SMALL).view(-1).tolist()
    assert got == [0, 11 * 8 + 7, -1, 6 * 8 + 4, -1, -1]
    # Non-finite and far-away coordinates are outside, whichever axis carries them.
    odd = torch.tensor([
        [float("nan"), 0.0, 0.0], [0.0, float("nan"), 0.0], [0.0, 0.0, float("nan")],
        [float("inf"), 0.0, 0.0], [0.0, float("-inf"), 0.0], [3e38, 0.0, 0.0], [0.0, -3e38, 0.0],
        [-4.0001, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, -2.0],
    ]).view(1, 1, 10, 1, 1, 3)
    assert bev_cell_index(odd, SMALL).view(-1).tolist() == [-1] * 9 + [6 * 8 + 4]
    assert bev_cell_index(torch.tensor([0.5, 0.25, 1.9]), SMALL).item() == 6 * 8 + 4  # a single point
    assert (SMALL.ny, SMALL.nx, SMALL.nz) == (12, 8, 1)


def test_cell_keys_of_later_samples_stay_exact():
    # 1000 x 1000 cells: sample 5's keys are past float32's exact integers if formed in float.
    module = importlib.import_module("bevkit.ops.bev_pool")
    grid = BEVGridSpec(xbound=(-50.0, 50.0, 0.1), ybound=(-50.0, 50.0, 0.1), zbound=(-5.0, 3.0, 8.0))
    points = _random_points(1, 2, 3, 2, 4, spread=30.0)[0]
    table = module._cell_table(grid, 6, points.device)
    alone = bev_cell_index(points, grid)
    for k in (1, 5):
        got = module._flat_cells(points, grid, k, table).long()
        assert torch.equal(got, torch.where(alone >= 0, alone + k * grid.ny * grid.nx, alone))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cell_keys_in_half_precision(dtype):
    # Cell centres of a 32 x 32 grid: their table positions pass the integers half floats hold.
    centres = torch.arange(GRID.nx) * 3.2 - 51.2 + 1.6
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack((x, y, torch.zeros_like(x)), -1).view(1, 1, 1, GRID.ny, GRID.nx, 3)
    want = torch.arange(GRID.ny * GRID.nx).view(1, 1, 1, GRID.ny, GRID.nx)
    assert torch.equal(bev_cell_index(points.to(dtype), GRID), want)


def test_backward_leaves_a_viewed_depth_alone():
    # With H = W = 1 the column-order depth is a view of the caller's tensor; a softmax output
    # must survive the backward untouched (a second backward would fail otherwise).
    points = torch.zeros(1, 2, 4, 1, 1, 3)
    points[0, 0, :2] = 100.0  # some points outside the grid
    logits = torch.randn(1, 2, 4, 1, 1, requires_grad=True)
    feats = torch.randn(1, 2, 3, 1, 1, requires_grad=True)
    depth = logits.softmax(2)
    before = depth.detach().clone()
    out = bev_pool(depth, feats, bev_pool_plan(points, SMALL))
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert torch.equal(depth.detach(), before) and logits.grad.abs().sum() > 0


def test_single_point_lands_in_its_cell():
    depth = torch.ones(1, 1, 1, 1, 1)
    feats = torch.tensor([2.0, -3.0]).view(1, 1, 2, 1, 1)
    pts = torch.tensor([1.2, -0.7, 0.0]).view(1, 1, 1, 1, 1, 3)  # ix = 5, iy = 4
    out = bev_pool(depth, feats, bev_pool_plan(pts, SMALL))
    expected = torch.zeros(1, 2, 12, 8)
    expected[0, :, 4, 5] = torch.tensor([2.0, -3.0])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_fast_and_exportable_match_reference(case, frustum, assert_rel):
    points, grid = _cases(frustum)[case]
    b, n, d, h, w, _ = points.shape
    depth, feats = _inputs(b, n, d, h, w, c=5)
    grad = torch.randn(b, 5, grid.ny, grid.nx, generator=torch.Generator().manual_seed(3))
    plan = bev_pool_plan(points, grid)
    paths = {
        "reference": lambda dp, ft: bev_pool_reference(dp, ft, points, grid),
        "fast": lambda dp, ft: bev_pool(dp, ft, plan),
        "exportable": lambda dp, ft: bev_pool_exportable(dp, ft, bev_cell_index(points, grid), grid),
        "cumsum": lambda dp, ft: bev_pool_cumsum(dp, ft, points, grid),
    }
    results = {}
    for name, fn in paths.items():
        dp, ft = depth.clone().requires_grad_(), feats.clone().requires_grad_()
        out = fn(dp, ft)
        out.backward(grad)
        results[name] = (out.detach(), dp.grad, ft.grad)
    ref = results.pop("reference")
    if case == "rig_b1":
        assert plan.num_entries > 0.2 * depth.numel()  # real geometry fills the grid
    if case in ("all_outside", "empty"):
        assert plan.num_entries == 0 and ref[0].abs().max() == 0
        assert plan.num_runs == 0 and plan.starts.tolist() == [depth.numel()]
    for name, got in results.items():
        tol = 1e-4 if name == "cumsum" else 1e-5  # the cumsum trick differences prefix sums
        for g, r in zip(got, ref):
            assert_rel(g, r, tol)


def _fwd_bwd_against_reference(points, grid, depth, feats, plan, assert_rel, seed=5):
    dp, ft = depth.clone().requires_grad_(), feats.clone().requires_grad_()
    rp, rf = depth.clone().requires_grad_(), feats.clone().requires_grad_()
    out, ref = bev_pool(dp, ft, plan), bev_pool_reference(rp, rf, points, grid)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad)
    ref.backward(grad)
    for got, want in ((out.detach(), ref.detach()), (dp.grad, rp.grad), (ft.grad, rf.grad)):
        assert_rel(got, want, 1e-5)


def test_runs_follow_image_columns_on_the_rig(frustum, assert_rel):
    # Points of one image column at one depth stand above one another: runs are long.
    points = frustum(depth_bins=16, feat_hw=(8, 22)).float().unsqueeze(0)
    plan = bev_pool_plan(points, GRID)
    assert plan.num_entries > 3 * plan.num_runs > 0
    depth, feats = _inputs(1, 6, 16, 8, 22, c=3)
    _fwd_bwd_against_reference(points, GRID, depth, feats, plan, assert_rel)


def test_runs_at_sample_edges_and_in_chunks(monkeypatch, assert_rel):
    module = importlib.import_module("bevkit.ops.bev_pool")  # the package exports a function of that name
    # Sample 0 starts outside the grid, sample 1 starts inside in the same cell as sample 0's last
    # point; both end in runs that hold trailing outside points. Tiny chunks split the runs.
    points = _random_points(2, 2, 5, 4, 6, spread=2.0)
    points[0, 0, 0, 0, 0] = torch.tensor([100.0, 0.0, 0.0])
    points[1, 0, 0, 0, 0] = points[0, -1, -1, -1, -1] = torch.tensor([0.5, 0.25, 0.0])
    points[:, :, -1] += 50.0  # the last depth bin of every camera is outside
    depth, feats = _inputs(2, 2, 5, 4, 6, c=3)
    monkeypatch.setattr(module, "_RUNS_PER_CHUNK", 3)
    plan = bev_pool_plan(points, SMALL)
    assert len(plan.chunks) > 3 and plan.num_entries < depth.numel()
    _fwd_bwd_against_reference(points, SMALL, depth, feats, plan, assert_rel)


def test_large_grid_and_batch_use_wide_keys(assert_rel):
    # 200 x 200 cells per sample; three samples offset their rows.
    grid = BEVGridSpec(xbound=(-10.0, 10.0, 0.1), ybound=(-10.0, 10.0, 0.1), zbound=(-2.0, 2.0, 4.0))
    points = _random_points(3, 2, 6, 3, 5, spread=6.0)
    depth, feats = _inputs(3, 2, 6, 3, 5, c=4)
    plan = bev_pool_plan(points, grid)
    assert grid.ny * grid.nx >= 2**15 and plan.num_entries > 100
    _fwd_bwd_against_reference(points, grid, depth, feats, plan, assert_rel)


def test_plan_constants_are_made_once_and_left_alone(assert_rel):
    module = importlib.import_module("bevkit.ops.bev_pool")
    grid = BEVGridSpec(xbound=(-6.0, 6.0, 0.75), ybound=(-6.0, 6.0, 0.75), zbound=(-2.0, 2.0, 4.0))
    points = _random_points(2, 2, 5, 4, 6, spread=3.0)
    with torch.inference_mode():  # the grid's constants are first made here
        first = bev_pool_plan(points, grid)
    table = module._cell_table(grid, 2, points.device)
    assert table is module._cell_table(grid, 2, points.device) and not table.is_inference()
    before = table.clone()
    depth, feats = _inputs(2, 2, 5, 4, 6, c=3)
    plan = bev_pool_plan(points, grid)
    _fwd_bwd_against_reference(points, grid, depth, feats, plan, assert_rel)
    assert torch.equal(table, before) and torch.equal(first.col, plan.col) and torch.equal(first.starts, plan.starts)
    rows = module._binning_rows(((-6.0, -6.0, -2.0), (0.75, 0.75, 4.0), (16, 16, 1)), 24, torch.float32, table.device)
    assert not any(r.is_inference() for r in rows) and rows[3][:3].tolist() == [16.0, 16.0, 1.0]
    module._cell_table_of.cache_clear()
    assert module._cell_table(grid, 2, points.device) is not table


def test_plan_constants_are_not_kept_from_fake_tensor_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = importlib.import_module("bevkit.ops.bev_pool")
    grid = BEVGridSpec(xbound=(-5.0, 5.0, 0.625), ybound=(-5.0, 5.0, 0.625), zbound=(-2.0, 2.0, 4.0))
    points = _random_points(1, 2, 3, 4, 5, spread=3.0)
    module._cell_table_of.cache_clear()
    module._binning_rows.cache_clear()
    with FakeTensorMode() as mode:
        assert bev_cell_index(mode.from_tensor(points), grid).shape == points.shape[:-1]
    got = bev_cell_index(points, grid)  # real tensors after the trace, from a real cache
    ix, iy = ((points[..., 0] + 5.0) / 0.625).floor(), ((points[..., 1] + 5.0) / 0.625).floor()
    inside = (ix >= 0) & (ix < 16) & (iy >= 0) & (iy < 16) & (points[..., 2] >= -2.0) & (points[..., 2] < 2.0)
    assert torch.equal(got, torch.where(inside, iy * 16 + ix, -1).long())


def test_cell_keys_of_bfloat16_points_on_a_wide_grid():
    # 301 cells a side: past the integers bfloat16 holds, so the clamp bound must not round.
    grid = BEVGridSpec(xbound=(-150.5, 150.5, 1.0), ybound=(-150.5, 150.5, 1.0), zbound=(-2.0, 2.0, 4.0))
    points = torch.tensor([[1e4, 0.0, 0.0], [-1e4, 0.0, 0.0], [149.0, 0.0, 0.0], [0.0, 149.0, 0.0]])
    want = bev_cell_index(points.to(torch.bfloat16).float(), grid)
    assert torch.equal(bev_cell_index(points.to(torch.bfloat16), grid), want)
    assert want[:2].tolist() == [-1, -1] and want[2:].tolist() == [150 * 301 + 299, 299 * 301 + 150]


def test_plan_accepts_points_that_require_grad(assert_rel):
    points = _random_points(1, 2, 5, 4, 6, spread=2.0).requires_grad_()
    depth, feats = _inputs(1, 2, 5, 4, 6, c=3)
    plan = bev_pool_plan(points, SMALL)
    _fwd_bwd_against_reference(points.detach(), SMALL, depth, feats, plan, assert_rel)


def test_plan_is_reused_across_calls(frustum, assert_rel):
    points = frustum(depth_bins=8, feat_hw=(4, 12)).float().unsqueeze(0)
    plan = bev_pool_plan(points, GRID)
    for seed in (0, 1):
        depth, feats = _inputs(1, 6, 8, 4, 12, c=3, seed=seed)
        assert_rel(bev_pool(depth, feats, plan), bev_pool_reference(depth, feats, points, GRID), 1e-5)


def test_plan_shape_mismatch_is_refused():
    plan = bev_pool_plan(_random_points(1, 2, 5, 4, 6), SMALL)
    depth, feats = _inputs(1, 2, 5, 4, 7, c=3)
    with pytest.raises(ValueError, match="plan was built"):
        bev_pool(depth, feats, plan)
    depth, feats = _inputs(1, 2, 5, 4, 6, c=3)
    with pytest.raises(ValueError, match="same dtype"):
        bev_pool(depth, feats.double(), plan)


def test_fast_float32_against_float64_reference(frustum, assert_rel):
    points = frustum(depth_bins=16, feat_hw=(8, 22)).unsqueeze(0)
    depth, feats = _inputs(1, 6, 16, 8, 22, c=8, dtype=torch.float64)
    ref64 = bev_pool_reference(depth, feats, points, GRID)
    fast32 = bev_pool(depth.float(), feats.float(), bev_pool_plan(points.float(), GRID))
    assert_rel(fast32.double(), ref64, 2e-6)


@pytest.mark.parametrize("path", ["fast", "exportable", "cumsum"])
def test_gradcheck_float64(path):
    points = _random_points(2, 2, 3, 2, 3, spread=3.0, dtype=torch.float64)
    depth, feats = _inputs(2, 2, 3, 2, 3, c=2, dtype=torch.float64)
    plan = bev_pool_plan(points, SMALL)
    assert plan.num_entries > 10
    fn = {
        "fast": lambda dp, ft: bev_pool(dp, ft, plan),
        "exportable": lambda dp, ft: bev_pool_exportable(dp, ft, bev_cell_index(points, SMALL), SMALL),
        "cumsum": lambda dp, ft: bev_pool_cumsum(dp, ft, points, SMALL),
    }[path]
    # fast_mode checks a random projection of the Jacobian: the same check with far fewer calls.
    assert torch.autograd.gradcheck(fn, (depth.requires_grad_(), feats.requires_grad_()), fast_mode=True)


@pytest.mark.gpu
def test_fast_on_cuda_matches_cpu(cuda_device, frustum, assert_rel):
    points = frustum(depth_bins=8, feat_hw=(4, 12)).float().unsqueeze(0)
    depth, feats = _inputs(1, 6, 8, 4, 12, c=3)
    expected = bev_pool_reference(depth, feats, points, GRID)
    plan = bev_pool_plan(points.to(cuda_device), GRID)
    got = bev_pool(depth.to(cuda_device), feats.to(cuda_device), plan)
    assert_rel(got.cpu(), expected, 1e-5)
    # Gradients too: the backward's compressed-row pattern and bags run on the GPU's kernels.
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
    rp, rf = depth.clone().requires_grad_(), feats.clone().requires_grad_()
    bev_pool_reference(rp, rf, points, GRID).backward(grad)
    dp = depth.to(cuda_device).requires_grad_()
    ft = feats.to(cuda_device).requires_grad_()
    bev_pool(dp, ft, plan).backward(grad.to(cuda_device))
    assert_rel(dp.grad.cpu(), rp.grad, 1e-5)
    assert_rel(ft.grad.cpu(), rf.grad, 1e-5)
