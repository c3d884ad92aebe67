import pytest
import torch

from bevkit.ops import (
    pillar_scatter,
    pillar_scatter_reference,
    voxelize,
    voxelize_batch,
    voxelize_reference,
)

RANGE = (-8.0, -6.0, -2.0, 8.0, 6.0, 2.0)
PILLAR = (0.5, 0.5, 4.0)
VOXEL = (1.0, 1.0, 1.0)


def _cloud(n, seed=0, spread=10.0):
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 4, generator=gen) * torch.tensor([2 * spread, 2 * spread, 5.0, 1.0])
    pts -= torch.tensor([spread, spread, 2.5, 0.0])
    dup = pts[: n // 4] + 0.01  # many voxels with several points
    return torch.cat((pts, dup))[torch.randperm(n + n // 4, generator=gen)]


def _assert_same(a, b):
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.coords, b.coords)
    assert torch.equal(a.num_points, b.num_points)


@pytest.mark.parametrize("voxel_size", [PILLAR, VOXEL])
@pytest.mark.parametrize("max_points,max_voxels", [(32, 100000), (2, 100000), (5, 40), (1, 1)])
def test_matches_reference(voxel_size, max_points, max_voxels):
    pts = _cloud(800)
    fast = voxelize(pts, voxel_size, RANGE, max_points, max_voxels)
    _assert_same(fast, voxelize_reference(pts, voxel_size, RANGE, max_points, max_voxels))
    assert fast.coords.shape[0] == min(max_voxels, fast.coords.shape[0])
    assert (fast.num_points <= max_points).all() and (fast.num_points >= 1).all()


def test_hand_computed_voxel():
    pts = torch.tensor([[0.1, 0.2, 0.0, 1.0], [0.3, 0.4, 1.0, 2.0], [-7.9, 5.9, -1.9, 3.0],
                        [8.0, 0.0, 0.0, 4.0]])  # the last is on xmax: outside
    vox = voxelize(pts, PILLAR, RANGE, max_points=4, max_voxels=10)
    # (iz, iy, ix): x 0.1 -> ix 16, y 0.2 -> iy 12; first voxel holds the first two points.
    assert vox.coords.tolist() == [[0, 12, 16], [0, 23, 0]]  # y 5.9 -> iy 23
    assert vox.num_points.tolist() == [2, 1]
    assert torch.equal(vox.features[0, :2], pts[:2])
    assert vox.features[0, 2:].abs().max() == 0


def test_deterministic_under_repeat():
    pts = _cloud(500, seed=3)
    a = voxelize(pts, VOXEL, RANGE, 3, 50)
    b = voxelize(pts.clone(), VOXEL, RANGE, 3, 50)
    _assert_same(a, b)


@pytest.mark.parametrize("case", ["empty", "all_outside"])
def test_edge_cases(case):
    pts = torch.zeros(0, 4) if case == "empty" else _cloud(50) + torch.tensor([100.0, 0, 0, 0])
    vox = voxelize(pts, PILLAR, RANGE, 8, 100)
    assert vox.features.shape == (0, 8, 4) and vox.coords.shape == (0, 3)
    _assert_same(vox, voxelize_reference(pts, PILLAR, RANGE, 8, 100))


def test_batch_and_pillar_scatter(assert_rel):
    clouds = [_cloud(300, seed=1), _cloud(200, seed=2)[:0], _cloud(250, seed=3)]  # middle one empty
    vox = voxelize_batch(clouds, PILLAR, RANGE, 4, 1000)
    assert vox.coords.shape[1] == 4 and set(vox.coords[:, 0].tolist()) == {0, 2}
    feats = vox.features.sum(1).requires_grad_()  # (V, 4)
    ny, nx = 24, 32
    grad = torch.randn(3, 4, ny, nx)
    out = pillar_scatter(feats, vox.coords, 3, (ny, nx))
    out.backward(grad)
    g_fast = feats.grad.clone()
    feats.grad = None
    ref = pillar_scatter_reference(feats, vox.coords, 3, (ny, nx))
    ref.backward(grad)
    assert_rel(out.detach(), ref.detach(), 1e-6)
    assert_rel(g_fast, feats.grad, 1e-6)
    assert out[1].abs().max() == 0  # the empty sample stays empty
    b, _, iy, ix = vox.coords[0].tolist()
    assert torch.equal(out[b, :, iy, ix], feats[0])
