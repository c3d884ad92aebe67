"""Sparse 3D convolution against a dense conv3d of the same grid: values, gradients, output voxels."""

import pytest
import torch
import torch.nn.functional as F

from bevkit.ops import (
    SparseVoxels,
    sparse_conv3d,
    sparse_conv3d_reference,
    strided_output_coords,
)


def random_voxels(shape=(7, 9, 10), batch=2, channels=4, fill=0.15, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, *shape, generator=g) < fill
    occ[0, 0, 0, 0] = True  # a voxel in a corner of the grid
    occ[-1, -1, -1, -1] = True  # and in the opposite corner of the last sample
    coords = occ.nonzero()
    perm = torch.randperm(len(coords), generator=g)  # from_voxels must sort
    feats = torch.randn(len(coords), channels, generator=g, dtype=dtype)
    return SparseVoxels.from_voxels(feats[perm], coords[perm], shape, batch)


def leaf(x: SparseVoxels) -> SparseVoxels:
    return x.replace(x.features.detach().clone().requires_grad_(True))


def compare(x, weight, bias, assert_rel, **kw):
    xa, xb = leaf(x), leaf(x)
    wa, wb = weight.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ba, bb = bias.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    fast = sparse_conv3d(xa, wa, ba, **kw)
    ref = sparse_conv3d_reference(xb, wb, bb, **kw)
    assert torch.equal(fast.coords, ref.coords)
    assert fast.shape == ref.shape
    assert_rel(fast.features.detach(), ref.features.detach(), 1e-5)
    g = torch.randn_like(ref.features)
    (fast.features * g).sum().backward()
    (ref.features * g).sum().backward()
    assert_rel(xa.features.grad, xb.features.grad, 1e-5)
    assert_rel(wa.grad, wb.grad, 1e-5)
    assert_rel(ba.grad, bb.grad, 1e-5)
    return fast


def test_submanifold_equals_dense_conv_at_the_input_voxels(assert_rel):
    x = random_voxels()
    w = torch.randn(3, 3, 3, 4, 6) * 0.2
    out = compare(x, w, torch.randn(6), assert_rel, subm=True)
    assert torch.equal(out.coords, x.coords)  # sparsity does not grow
    assert out.pairs is x.pairs and (3, 3, 3) in x.pairs


@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3, 3), 2, 1),            # the encoder's downsampling
    ((3, 3, 3), 2, (0, 1, 1)),    # BEVFusion's stage-3 padding (none along z)
    ((3, 1, 1), (2, 1, 1), 0),    # BEVFusion's output conv along z
    ((2, 2, 2), 2, 0),
])
def test_strided_equals_dense_conv_and_writes_its_support(kernel, stride, padding, assert_rel):
    x = random_voxels()
    w = torch.randn(*kernel, 4, 5) * 0.2
    out = compare(x, w, torch.randn(5), assert_rel, stride=stride, padding=padding)
    # The output voxels are exactly where the dense convolution of the occupancy is non-zero.
    occ = torch.zeros(x.batch_size, 1, *x.shape)
    b, iz, iy, ix = x.coords.unbind(1)
    occ[b, 0, iz, iy, ix] = 1.0
    support = F.conv3d(occ, torch.ones(1, 1, *kernel), stride=stride, padding=padding)[:, 0] > 0
    assert torch.equal(support.nonzero(), out.coords)


def test_gradcheck_float64():
    x = random_voxels(shape=(4, 5, 5), batch=2, channels=2, fill=0.3, dtype=torch.float64)
    feats = x.features.clone().requires_grad_(True)
    w = (torch.randn(3, 3, 3, 2, 3, dtype=torch.float64) * 0.3).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, w_, b_: sparse_conv3d(x.replace(f), w_, b_, subm=True).features,
                             (feats, w, b))
    torch.autograd.gradcheck(lambda f, w_, b_: sparse_conv3d(x.replace(f), w_, b_, stride=2, padding=1).features,
                             (feats, w, b))


def test_empty_input_and_single_sample(assert_rel):
    empty = SparseVoxels.from_voxels(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long), (5, 6, 7), 2)
    w = torch.randn(3, 3, 3, 4, 3)
    for kw in ({"subm": True}, {"stride": 2, "padding": 1}):
        out = sparse_conv3d(empty, w, torch.zeros(3), **kw)
        assert out.features.shape == (0, 3) and out.coords.shape == (0, 4)
        assert out.dense().shape[:2] == (2, 3) and not out.dense().any()
    one = random_voxels(batch=1, seed=3)
    compare(one, w * 0.2, torch.randn(3), assert_rel, subm=True)
    compare(one, w * 0.2, torch.randn(3), assert_rel, stride=2, padding=1)


def test_dense_round_trip_and_bad_voxels():
    x = random_voxels()
    d = x.dense()
    assert d.shape == (2, 4, 7, 9, 10)
    assert int((d.abs().sum(1) > 0).sum()) == len(x.coords)  # zero everywhere else
    b, iz, iy, ix = x.coords.unbind(1)
    assert torch.equal(d[b, :, iz, iy, ix], x.features)
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="duplicate"):
        SparseVoxels.from_voxels(torch.zeros(2, 1), coords, (3, 3, 3), 1)
    with pytest.raises(ValueError, match="must lie in"):
        SparseVoxels.from_voxels(torch.zeros(1, 1), torch.tensor([[0, 3, 0, 0]]), (3, 3, 3), 1)
    with pytest.raises(ValueError, match="must lie in"):
        SparseVoxels.from_voxels(torch.zeros(1, 1), torch.tensor([[1, 0, 0, 0]]), (3, 3, 3), 1)
    with pytest.raises(ValueError, match="weight must be"):
        sparse_conv3d(x, torch.zeros(3, 3, 3, 5, 2), subm=True)


def test_output_coords_of_a_single_voxel():
    coords = torch.tensor([[0, 2, 3, 4]])
    out, shape = strided_output_coords(coords, (5, 7, 9), 3, 2, 1)
    assert shape == (3, 4, 5)
    # Input index i is reached from outputs o with o * 2 - 1 + k = i, k in 0..2.
    expect = [(0, z, y, x) for z in (1,) for y in (1, 2) for x in (2,)]
    assert out.tolist() == [list(e) for e in expect]


@pytest.mark.gpu
def test_cuda_matches_cpu(cuda_device):
    x = random_voxels()
    w = torch.randn(3, 3, 3, 4, 6)
    cpu = sparse_conv3d(x, w, subm=True).features
    xg = SparseVoxels(x.features.to(cuda_device), x.coords.to(cuda_device), x.shape, x.batch_size)
    gpu = sparse_conv3d(xg, w.to(cuda_device), subm=True).features
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close():
    x = random_voxels(channels=8)
    w = torch.randn(3, 3, 3, 8, 8) * 0.1
    exact = sparse_conv3d(x, w, subm=True).features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sparse_conv3d(x, w, subm=True).features
    assert low.dtype == torch.float32  # accumulated in the input's dtype
    assert float((low - exact).abs().max()) <= 0.05 * float(exact.abs().max())
