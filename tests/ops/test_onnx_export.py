"""The exportable paths export with torch.onnx.export(dynamo=True) and match in onnxruntime."""

import warnings

import pytest
import torch

from bevkit.ops import (
    BEVGridSpec,
    bev_cell_index,
    bev_pool_exportable,
    bev_pool_reference,
    bev_warp,
    bev_warp_reference,
    deform_attn_exportable,
    deform_attn_reference,
    deform_conv2d,
    deform_conv2d_reference,
    pillar_scatter,
    pillar_scatter_reference,
)

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

GRID = BEVGridSpec(xbound=(-51.2, 51.2, 3.2), ybound=(-51.2, 51.2, 3.2), zbound=(-5.0, 3.0, 8.0))


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _run_onnx(fn, inputs, tmp_path):
    path = tmp_path / "op.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Fn(fn).eval(), tuple(inputs), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def test_bev_pool_exports(frustum, tmp_path, assert_rel):
    points = frustum(depth_bins=6, feat_hw=(4, 8)).float().unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(1, 6, 6, 4, 8, generator=gen).softmax(2)
    feats = torch.randn(1, 6, 5, 4, 8, generator=gen)
    cells = bev_cell_index(points, GRID)
    got = _run_onnx(lambda d, f, c: bev_pool_exportable(d, f, c, GRID), [depth, feats, cells], tmp_path)
    expected = bev_pool_reference(depth, feats, points, GRID)
    assert expected.abs().max() > 0
    assert_rel(got, expected, 1e-5)


def test_deform_attn_exports(tmp_path, assert_rel):
    shapes = [(6, 10), (3, 5)]
    gen = torch.Generator().manual_seed(1)
    value = torch.randn(2, 75, 2, 4, generator=gen)
    loc = torch.rand(2, 12, 2, 2, 3, 2, generator=gen) * 1.2 - 0.1
    attn = torch.rand(2, 12, 2, 2, 3, generator=gen)
    got = _run_onnx(lambda v, l, a: deform_attn_exportable(v, shapes, l, a), [value, loc, attn], tmp_path)
    assert_rel(got, deform_attn_reference(value, shapes, loc, attn), 1e-5)


def test_bev_warp_exports(tmp_path, assert_rel):
    bev = torch.randn(2, 3, GRID.ny, GRID.nx, generator=torch.Generator().manual_seed(2))
    motion = torch.eye(4).repeat(2, 1, 1)
    motion[0, :2, :2] = torch.tensor([[0.96, -0.28], [0.28, 0.96]])
    motion[:, 0, 3] = torch.tensor([1.5, -4.0])
    got = _run_onnx(lambda b, m: bev_warp(b, m, GRID), [bev, motion], tmp_path)
    assert_rel(got, bev_warp_reference(bev, motion, GRID), 1e-5)


def test_pillar_scatter_exports(tmp_path, assert_rel):
    gen = torch.Generator().manual_seed(3)
    flat = torch.randperm(2 * 12 * 16, generator=gen)[:40]
    coords = torch.stack((flat // 192, torch.zeros_like(flat), (flat % 192) // 16, flat % 16), dim=1)
    feats = torch.randn(40, 5, generator=gen)
    got = _run_onnx(lambda f, c: pillar_scatter(f, c, 2, (12, 16)), [feats, coords], tmp_path)
    assert_rel(got, pillar_scatter_reference(feats, coords, 2, (12, 16)), 1e-6)


def test_deform_conv2d_exports(tmp_path, assert_rel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 9, generator=gen)
    offset = 2 * torch.randn(1, 18, 6, 9, generator=gen)
    weight = torch.randn(4, 2, 3, 3, generator=gen)
    got = _run_onnx(lambda a, o, w: deform_conv2d(a, o, w, padding=1, groups=4), [x, offset, weight], tmp_path)
    assert_rel(got, deform_conv2d_reference(x, offset, weight, padding=1, groups=4), 1e-5)
