"""Deformable convolution: the grid_sample path equals the per-tap reference and torchvision's kernel,
values and gradients, at borders (zero padding) and with groups, offset groups and dilation."""

import pytest
import torch

from bevkit.ops import deform_conv2d, deform_conv2d_reference

CASES = [  # (B, C, H, W, O, groups, offset groups, padding, dilation)
    (2, 8, 5, 7, 12, 4, 1, 1, 1),
    (1, 6, 4, 3, 6, 1, 2, 2, 2),
    (1, 4, 1, 1, 4, 1, 1, 1, 1),  # a single cell: every tap but the centre reads padding
]


def _inputs(case, dtype, seed=0):
    b, c, h, w, o, groups, og, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    offset = 2.5 * torch.randn(b, 2 * og * 9, h, w, generator=gen, dtype=dtype)  # many taps leave the map
    weight = torch.randn(o, c // groups, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)
    return x, offset, weight, bias


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_reference_and_torchvision(case):
    tv = pytest.importorskip("torchvision.ops")
    *_, groups, _, pad, dil = case
    x, offset, weight, bias = _inputs(case, torch.float64)
    ours = deform_conv2d(x, offset, weight, bias, padding=pad, dilation=dil, groups=groups)
    ref = deform_conv2d_reference(x, offset, weight, bias, padding=pad, dilation=dil, groups=groups)
    oracle = tv.deform_conv2d(x, offset, weight, bias, padding=pad, dilation=dil)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(ours, oracle, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:2])
def test_gradients_equal_the_reference_in_float32(case):
    *_, groups, _, pad, dil = case
    grads = []
    for fn in (deform_conv2d, deform_conv2d_reference):
        inputs = [t.clone().requires_grad_() for t in _inputs(case, torch.float32)]
        out = fn(*inputs, padding=pad, dilation=dil, groups=groups)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())


def test_gradcheck_float64():
    case = (1, 4, 3, 4, 2, 2, 1, 1, 1)
    x, offset, weight, bias = (t.requires_grad_() for t in _inputs(case, torch.float64, seed=1))
    # Offsets away from integer positions, where bilinear sampling is differentiable.
    with torch.no_grad():
        offset.copy_(torch.round(offset) + 0.3)
    assert torch.autograd.gradcheck(lambda *a: deform_conv2d(*a, padding=1, groups=2), (x, offset, weight, bias))


def test_zero_offsets_are_an_ordinary_convolution_and_bad_shapes_are_refused():
    x, _, weight, bias = _inputs(CASES[0], torch.float64)
    offset = torch.zeros(2, 18, 5, 7, dtype=torch.float64)
    plain = torch.nn.functional.conv2d(x, weight, bias, padding=1, groups=4)
    assert torch.allclose(deform_conv2d(x, offset, weight, bias, padding=1, groups=4), plain, atol=1e-12)
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(x, offset[:, :17], weight, padding=1, groups=4)
    with pytest.raises(ValueError, match="groups"):
        deform_conv2d(x, offset, weight, padding=1, groups=3)
