import math

import pytest
import torch

from bevkit.ops import BEVGridSpec, bev_warp, bev_warp_reference

GRID = BEVGridSpec(xbound=(-10.0, 10.0, 0.5), ybound=(-8.0, 8.0, 0.5), zbound=(-5.0, 3.0, 8.0))


def planar(yaw, tx, ty, dtype=torch.float64):
    """curr_from_prev for a planar ego motion (rotation about z, then translation)."""
    m = torch.eye(4, dtype=dtype)
    m[0, 0] = m[1, 1] = math.cos(yaw)
    m[0, 1], m[1, 0] = -math.sin(yaw), math.sin(yaw)
    m[0, 3], m[1, 3] = tx, ty
    return m


def _bev(b, dtype=torch.float32, seed=0):
    return torch.randn(b, 3, GRID.ny, GRID.nx, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("motions", [[(0.3, 1.2, -0.7)], [(0.3, 1.2, -0.7), (-0.05, 4.0, 0.2), (1.5, -30, 0)]])
def test_matches_reference(motions, assert_rel):
    bev = _bev(len(motions))
    curr_from_prev = torch.stack([planar(*m, dtype=torch.float32) for m in motions])
    grad = torch.randn_like(bev)
    results = []
    for fn in (bev_warp, bev_warp_reference):
        x = bev.clone().requires_grad_()
        out = fn(x, curr_from_prev, GRID)
        out.backward(grad)
        results.append((out.detach(), x.grad))
    for got, ref in zip(*results):
        assert_rel(got, ref, 1e-5)


def test_identity_and_one_cell_shift():
    bev = _bev(2, dtype=torch.float64)
    same = bev_warp(bev, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), GRID)
    torch.testing.assert_close(same, bev)
    # The ego drove one cell (0.5 m) forward: a static world moves one cell back (-x).
    moved = bev_warp(bev, planar(0.0, -0.5, 0.0).expand(2, 4, 4), GRID)
    torch.testing.assert_close(moved[..., :-1], bev[..., 1:])
    assert moved[..., -1].abs().max() == 0  # newly seen cells are empty


def test_quarter_turn_hand_computed():
    # Square grid, ego turned +90 deg (left): a point at prev (x=5, y=0) is at curr (0, -5).
    grid = BEVGridSpec(xbound=(-8.0, 8.0, 1.0), ybound=(-8.0, 8.0, 1.0), zbound=(-5.0, 3.0, 8.0))
    bev = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    bev[0, 0, 8, 13] = 1.0  # cell centre (x, y) = (5.5, 0.5)
    curr_from_prev = planar(-math.pi / 2, 0.0, 0.0).unsqueeze(0)
    out = bev_warp(bev, curr_from_prev, grid)
    iy, ix = divmod(int(out.view(-1).argmax()), 16)
    assert (ix, iy) == (8, 2)  # centre (0.5, -5.5)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_gradcheck_float64():
    bev = _bev(2, dtype=torch.float64)[:, :1, :6, :7].contiguous().requires_grad_()
    grid = BEVGridSpec(xbound=(-3.5, 3.5, 1.0), ybound=(-3.0, 3.0, 1.0), zbound=(-5.0, 3.0, 8.0))
    motion = torch.stack([planar(0.2, 0.3, -0.4), planar(-0.1, 1.1, 0.2)]).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, m: bev_warp(b, m, grid), (bev, motion))
    assert torch.autograd.gradcheck(lambda b: bev_warp_reference(b, motion.detach(), grid), (bev,))
