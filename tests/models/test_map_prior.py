"""The Neural Map Prior memory (read / write in the global frame, tiles, files) and its fusion module."""

import math

import pytest
import torch

from bevkit.models.map_prior import MapPriorFusion, MapPriorMemory, WindowCrossAttention
from bevkit.ops import BEVGridSpec

GRID = BEVGridSpec((-12.0, 12.0, 0.8), (-6.0, 6.0, 0.8), (-5.0, 3.0, 8.0))
NY, NX = 15, 30


def pose(yaw: float, x: float, y: float, z: float = 0.0) -> torch.Tensor:
    m = torch.eye(4, dtype=torch.float64)
    c, s = math.cos(yaw), math.sin(yaw)
    m[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    m[:3, 3] = torch.tensor([x, y, z], dtype=torch.float64)
    return m


def cell_centres() -> torch.Tensor:
    """(Y, X, 2) metres in the BEV frame."""
    xs = GRID.xbound[0] + (torch.arange(NX, dtype=torch.float64) + 0.5) * GRID.xbound[2]
    ys = GRID.ybound[0] + (torch.arange(NY, dtype=torch.float64) + 0.5) * GRID.ybound[2]
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx, cy], -1)


def to_global(p: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    return xy @ p[:2, :2].T + p[:2, 3]


def linear_field(g: torch.Tensor) -> torch.Tensor:
    """Two channels linear in global x, y: (Y, X, 2) -> (2, Y, X)."""
    return torch.stack([0.3 * g[..., 0] - 0.2 * g[..., 1] + 1.0, -0.1 * g[..., 0] + 0.05 * g[..., 1]]).float()


def test_a_map_written_from_one_pose_reads_back_from_another_in_the_global_frame():
    # Bilinear resampling reproduces a linear field exactly, so wherever pose B's cells fall well inside
    # pose A's patch, the prior read at B is the field at B's cells (rotated, shifted, far from the origin).
    mem = MapPriorMemory(2, cell=0.8, tile=16)
    a, b = pose(0.4, 1805.3, 947.9, 3.0), pose(0.9, 1808.1, 949.2, 3.2)
    written = mem.write(["boston"], a[None], GRID, linear_field(to_global(a, cell_centres()))[None])
    assert abs(written - 24 * 12 / 0.8 ** 2) < 0.15 * written  # about the patch's area in global cells
    prior, observed = mem.read(["boston"], b[None], GRID)
    assert prior.shape == (1, 2, NY, NX) and observed.shape == (1, 1, NY, NX)
    g_b = to_global(b, cell_centres())
    expected = linear_field(g_b)
    # B's cells expressed in A's frame: keep those at least 2.5 cells inside A's patch.
    in_a = (g_b - a[:2, 3]) @ a[:2, :2]
    margin = 2.5 * 0.8
    inner = ((in_a[..., 0] > -12 + margin) & (in_a[..., 0] < 12 - margin)
             & (in_a[..., 1] > -6 + margin) & (in_a[..., 1] < 6 - margin))
    assert inner.sum() > 100
    assert torch.allclose(observed[0, 0][inner], torch.ones(int(inner.sum())))
    assert torch.allclose(prior[0][:, inner], expected[:, inner], atol=1e-4)
    # Cells of B outside A's patch were never observed and read zero.
    outside = ((in_a[..., 0].abs() > 12 + 1.6) | (in_a[..., 1].abs() > 6 + 1.6))
    assert outside.any()
    assert (observed[0, 0][outside] == 0).all() and (prior[0][:, outside] == 0).all()


def test_grid_aligned_poses_round_trip_exactly_and_other_locations_stay_empty():
    mem = MapPriorMemory(4, cell=0.8, tile=8)
    # The BEV cell centres sit at x = (k + 0.5) 0.8 and y = k 0.8: shifted by (80, -39.6) they fall on
    # global cell centres, so writing and reading resample nothing.
    p = pose(0.0, 80.0, -39.6)
    feats = torch.randn(1, 4, NY, NX)
    mem.write(["a"], p[None], GRID, feats)
    prior, observed = mem.read(["a"], p[None], GRID)
    assert (prior - feats).abs().max() < 1e-4 and (observed > 1 - 1e-5).all()
    assert mem.observed_cells("a") == NY * NX and mem.observed_cells("b") == 0
    prior_b, observed_b = mem.read(["b"], p[None], GRID)  # same coordinates, another city
    assert (prior_b == 0).all() and (observed_b == 0).all()
    # Tiles exist only where something was written: the 30 x 15 patch touches at most 5 x 3 tiles of 8.
    assert 0 < len(mem.tiles) <= 5 * 3 and {k[0] for k in mem.tiles} == {"a"}


def test_a_bev_augmentation_reads_the_same_place_flipped():
    # The engine reads with global_from_bev = global_from_ego @ inv(bev_aug): a y-flipped BEV frame reads
    # the map written without augmentation, flipped along y.
    from bevkit.engine.module import global_from_bev

    mem = MapPriorMemory(3, cell=0.8)
    g = pose(0.0, 40.0, 16.4)  # BEV cells on global cells
    feats = torch.randn(1, 3, NY, NX)
    mem.write(["a"], global_from_bev({"global_from_ego": g[None]}), GRID, feats)
    flip = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))[None]
    prior, _ = mem.read(["a"], global_from_bev({"global_from_ego": g[None], "bev_aug": flip}), GRID)
    assert (prior - feats.flip(-2)).abs().max() < 1e-4


def test_later_writes_replace_earlier_ones_under_the_patch_only():
    mem = MapPriorMemory(1, cell=0.8)
    mem.write(["a"], pose(0.0, 0.0, 0.4)[None], GRID, torch.ones(1, 1, NY, NX))
    mem.write(["a"], pose(0.0, 12.0, 0.4)[None], GRID, torch.full((1, 1, NY, NX), 5.0))
    prior, _ = mem.read(["a"], pose(0.0, 0.0, 0.4)[None], GRID)
    # The second patch covers x in [0, 24) m of the global frame: this frame's right half.
    assert torch.allclose(prior[0, 0, :, NX // 2:], torch.full((NY, NX // 2), 5.0))
    assert torch.allclose(prior[0, 0, :, :NX // 2], torch.ones(NY, NX // 2))


def test_save_and_load_round_trip_atomically_and_refuse_other_files(tmp_path):
    mem = MapPriorMemory(3, cell=0.6, tile=16, dtype=torch.float16)
    p = pose(0.3, 500.0, 200.0)
    mem.write(["singapore-onenorth", "boston-seaport"], torch.stack([p, p]), GRID, torch.randn(2, 3, NY, NX))
    path = mem.save(tmp_path / "prior" / "memory.safetensors")
    assert [f.name for f in path.parent.iterdir()] == ["memory.safetensors"]  # no temporary left behind
    back = MapPriorMemory.load(path)
    assert (back.channels, back.cell, back.tile, back.dtype) == (3, 0.6, 16, torch.float16)
    assert back.tiles.keys() == mem.tiles.keys()
    assert all(torch.equal(back.tiles[k], mem.tiles[k]) for k in mem.tiles)
    a, _ = back.read(["boston-seaport"], p[None], GRID)
    b, _ = mem.read(["boston-seaport"], p[None], GRID)
    assert torch.equal(a, b) and a.dtype == torch.float32
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="damaged.safetensors"):
        MapPriorMemory.load(damaged)
    with pytest.raises(FileNotFoundError):
        MapPriorMemory.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="channels"):
        mem.write(["a"], p[None], GRID, torch.randn(1, 5, NY, NX))


def test_window_attention_reads_its_own_window_only():
    torch.manual_seed(0)
    attn = WindowCrossAttention(16, heads=4, window=4)
    q, prior = torch.randn(1, 16, 7, 10), torch.randn(1, 16, 7, 10)  # not whole windows: padded and masked
    base = attn(q, prior)
    assert base.shape == q.shape and torch.isfinite(base).all()
    changed = prior.clone()
    changed[:, :, 5, 9] += 3.0  # window (1, 2): rows 4-7, columns 8-11
    diff = (attn(q, changed) - base).abs().sum(1)[0]
    assert diff[4:, 8:].min() > 0
    diff[4:, 8:] = 0
    assert diff.max() == 0


def test_fusion_starts_near_the_current_bev_and_is_differentiable():
    torch.manual_seed(0)
    fusion = MapPriorFusion(16, (NY, NX), heads=4, window=5, ffn=32)
    bev, prior = torch.randn(2, 16, NY, NX), torch.randn(2, 16, NY, NX)
    out, update = fusion(bev, prior)
    assert out.shape == update.shape == bev.shape
    # A fresh module hands the decoder (almost) the current BEV: a trained baseline starts where it was.
    assert (out - bev).abs().max() < 1e-2 * bev.abs().max()
    assert (update - prior).abs().mean() > 0.1  # while the memory update already blends in the frame
    (out.square().mean() + update.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    # No prior (the first traversal) reads as zeros.
    assert all(torch.allclose(a, b) for a, b in zip(fusion(bev, None), fusion(bev, torch.zeros_like(bev))))
