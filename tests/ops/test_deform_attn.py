import pytest
import torch

from bevkit.ops import deform_attn, deform_attn_exportable, deform_attn_reference

SHAPES = [(6, 10), (3, 5), (2, 3)]


def _inputs(b, q, heads, dh, shapes, points, lo=-0.1, hi=1.1, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, heads, dh, generator=gen, dtype=dtype)
    loc = lo + (hi - lo) * torch.rand(b, q, heads, len(shapes), points, 2, generator=gen, dtype=dtype)
    attn = torch.rand(b, q, heads, len(shapes), points, generator=gen, dtype=dtype).softmax(-1)
    return value, loc, attn


def _rig_locations(rig, heads, levels, grid_cells=6, dtype=torch.float32):
    """BEVFormer spatial cross-attention sampling: BEV pillars projected into every camera.

    Query (iy, ix) of a grid over +-40 m samples 4 heights in [-2, 2] m; each camera
    is one batch element; normalised image coordinates (u / 1600, v / 900); points
    behind a camera are sent far off the image.
    """
    centres = torch.linspace(-40, 40, grid_cells, dtype=torch.float64)
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    zs = torch.linspace(-2, 2, 4, dtype=torch.float64)
    xyz_ego = torch.stack(torch.broadcast_tensors(xx[..., None], yy[..., None], zs), dim=-1).view(-1, 4, 3)
    locs = []
    for intrinsics, ego_from_cam in rig.values():
        cam_from_ego = torch.linalg.inv(ego_from_cam)
        xyz_cam = xyz_ego @ cam_from_ego[:3, :3].T + cam_from_ego[:3, 3]  # (Q, 4, 3)
        uvw = xyz_cam @ intrinsics.T
        front = uvw[..., 2] > 0.1
        uv = uvw[..., :2] / uvw[..., 2:].clamp(min=0.1) / torch.tensor([1600.0, 900.0], dtype=torch.float64)
        uv = torch.where(front[..., None], uv, torch.full_like(uv, 5.0))
        locs.append(uv)
    loc = torch.stack(locs)  # (N, Q, 4, 2)
    n, q = loc.shape[:2]
    loc = loc[:, :, None, None].expand(n, q, heads, levels, 4, 2)
    return loc.to(dtype).contiguous()


def _compare(value, shapes, loc, attn, assert_rel, tol=1e-5, chunk=7, loc_grad=True):
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                       generator=torch.Generator().manual_seed(5), dtype=value.dtype)
    paths = {
        "reference": lambda v, l, a: deform_attn_reference(v, shapes, l, a),
        "fast": lambda v, l, a: deform_attn(v, shapes, l, a, chunk_queries=chunk),
        "fast_one_chunk": lambda v, l, a: deform_attn(v, shapes, l, a),
        "exportable": lambda v, l, a: deform_attn_exportable(v, shapes, l, a),
    }
    results = {}
    for name, fn in paths.items():
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(*inputs)
        out.backward(grad)
        results[name] = (out.detach(), *(t.grad for t in inputs))
    ref = results.pop("reference")
    for name, (out, g_value, g_loc, g_attn) in results.items():
        assert_rel(out, ref[0], tol)
        assert_rel(g_value, ref[1], tol)
        assert_rel(g_attn, ref[3], tol)
        if loc_grad:
            assert_rel(g_loc, ref[2], tol)
    return ref


@pytest.mark.parametrize("b", [1, 3])
def test_random_matches_reference(b, assert_rel):
    value, loc, attn = _inputs(b, 20, 2, 4, SHAPES, points=3)
    _compare(value, SHAPES, loc, attn, assert_rel)


def test_rig_geometry_matches_reference(rig, assert_rel):
    heads, levels = 2, 2
    loc = _rig_locations(rig, heads, levels)
    shapes = [(9, 16), (5, 8)]
    value, _, attn = _inputs(6, loc.shape[1], heads, 4, shapes, points=4)
    inside = ((loc >= 0) & (loc <= 1)).all(-1)
    assert inside.any() and not inside.all()  # some pillars seen, some not
    _compare(value, shapes, loc, attn, assert_rel)


def test_borders_and_zero_padding(assert_rel):
    # On the map edges, on pixel centres and corners, half a pixel outside, far outside.
    shapes = [(4, 5)]
    special = torch.tensor([0.0, 1.0, 0.1, 0.9, -0.1, 1.1, 0.5, -3.0, 4.0, 1.0 / 8, 1.0 - 1.0 / 8])
    gen = torch.Generator().manual_seed(2)
    loc = special[torch.randint(0, special.numel(), (2, 30, 2, 1, 4, 2), generator=gen)]
    value, _, attn = _inputs(2, 30, 2, 3, shapes, points=4)
    # Exactly on a pixel centre the bilinear weight has a kink, where the location gradient is
    # one-sided and grid_sample's own rounding of 2u-1 picks a side; values and the other
    # gradients must match exactly there, and everything must match just off the kinks.
    _compare(value, shapes, loc, attn, assert_rel, loc_grad=False)
    jitter = 1e-3 * (torch.rand(loc.shape, generator=gen) - 0.5)
    _compare(value, shapes, loc + jitter, attn, assert_rel)
    # Far outside every level reads zeros (zero padding), for every path.
    far = torch.full_like(loc, 3.0)
    for fn in (deform_attn, deform_attn_exportable, deform_attn_reference):
        assert fn(value, shapes, far, attn).abs().max() == 0


def test_single_level_and_empty_queries(assert_rel):
    value, loc, attn = _inputs(2, 5, 1, 3, [(3, 4)], points=1)
    _compare(value, [(3, 4)], loc, attn, assert_rel)
    value, loc, attn = _inputs(2, 0, 2, 3, SHAPES, points=2)
    out = deform_attn(value, SHAPES, loc, attn)
    assert out.shape == (2, 0, 6)
    assert deform_attn_reference(value, SHAPES, loc, attn).shape == (2, 0, 6)


def test_bad_shapes_are_refused():
    value, loc, attn = _inputs(1, 4, 2, 3, SHAPES, points=2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        deform_attn(value, [(6, 10)], loc, attn)


@pytest.mark.parametrize("path", ["fast", "exportable"])
def test_gradcheck_float64(path):
    value, loc, attn = _inputs(2, 5, 2, 2, [(3, 4), (2, 2)], points=2, lo=-0.2, hi=1.2,
                               dtype=torch.float64)
    fn = {
        "fast": lambda v, l, a: deform_attn(v, [(3, 4), (2, 2)], l, a, chunk_queries=3),
        "exportable": lambda v, l, a: deform_attn_exportable(v, [(3, 4), (2, 2)], l, a),
    }[path]
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    # fast_mode checks a random projection of the Jacobian (same maths, far fewer evaluations).
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.gpu
def test_fast_on_cuda_matches_cpu(cuda_device, assert_rel):
    value, loc, attn = _inputs(2, 20, 2, 4, SHAPES, points=3)
    expected = deform_attn_reference(value, SHAPES, loc, attn)
    got = deform_attn(*(t.to(cuda_device) for t in (value,)), SHAPES, loc.to(cuda_device), attn.to(cuda_device))
    assert_rel(got.cpu(), expected, 1e-5)
