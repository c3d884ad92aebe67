"""Half precision and autocast: geometry, sampling positions, losses and decoded boxes stay float32."""

import torch
from test_build import CONFIGS
from tiny_batch import make_batch

from bevkit.models import build_model, load_config
from bevkit.models.bev_model import camera_geometry
from bevkit.models.view_transforms import depth_loss, frustum_points_ego
from bevkit.ops import deform_attn, deform_attn_exportable, deform_conv2d


def test_camera_geometry_and_frustum_are_float32_under_autocast():
    cfg = load_config(CONFIGS / "bevdet-synth.yaml")
    batch = make_batch(cfg, n_cams=2, batch=1)
    batch["bev_aug"] = torch.diag(torch.tensor([0.97, 0.97, 0.97, 1.0]))[None]
    depths = torch.arange(1.0, 45.0, 0.5)
    exact = frustum_points_ego(*camera_geometry(batch), depths, 16, 44, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        geometry = camera_geometry(batch)
        points = frustum_points_ego(*geometry, depths, 16, 44, 4)
    assert geometry[2].dtype == torch.float32 and points.dtype == torch.float32
    torch.testing.assert_close(points, exact)


def test_depth_loss_of_half_probabilities_is_computed_in_float32():
    gen = torch.Generator().manual_seed(0)
    depth = torch.randn(1, 2, 40, 4, 6, generator=gen).softmax(2)
    targets = torch.randint(-1, 40, (1, 2, 4, 6), generator=gen)
    exact = depth_loss(depth.bfloat16().float(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = depth_loss(depth.bfloat16(), targets)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact)


def test_centerhead_decodes_half_outputs_like_their_float32_values():
    cfg = load_config(CONFIGS / "pointpillars-synth.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, n_cams=1, batch=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch)["detection"]
        half = model.heads["detection"].decode(outputs)
    assert outputs[0]["heatmap"].dtype == torch.bfloat16
    full = model.heads["detection"].decode([{k: v.float() for k, v in out.items()} for out in outputs])
    assert len(half[0]["boxes"]) > 0 and torch.equal(half[0]["boxes"], full[0]["boxes"])


def test_half_deformable_ops_sample_at_float32_positions():
    gen = torch.Generator().manual_seed(2)
    shapes = [(50, 50), (25, 25)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 8, generator=gen)
    loc = torch.rand(1, 300, 2, 2, 4, 2, generator=gen)
    attn = torch.rand(1, 300, 2, 2, 4, generator=gen).softmax(-1)
    for fn in (deform_attn, deform_attn_exportable):
        for dtype in (torch.float16, torch.bfloat16):
            args = [t.to(dtype) for t in (value, loc, attn)]
            ref = fn(*[t.float() for t in args][:1], shapes, *[t.float() for t in args][1:])  # same inputs, float32
            out = fn(args[0], shapes, *args[1:])
            assert out.dtype == dtype
            # only the output's rounding: the sampling positions are not rounded to half floats inside
            err = (out.float() - ref).abs().max() / ref.abs().max()
            assert err < 0.01, (fn.__name__, dtype, float(err))
    x = torch.randn(1, 4, 64, 176, generator=gen).bfloat16()
    offset = (torch.randn(1, 18, 64, 176, generator=gen) * 3).bfloat16()
    weight = torch.randn(6, 4, 3, 3, generator=gen).bfloat16()
    ref = deform_conv2d(x.float(), offset.float(), weight.float(), padding=1)
    out = deform_conv2d(x, offset, weight, padding=1)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.02


def test_float64_geometry_stays_float64():
    from bevkit.models.view_transforms import nearest_point_depth

    cfg = load_config(CONFIGS / "bevdepth-synth.yaml")
    batch = make_batch(cfg, n_cams=2, batch=1)
    geometry = [t.double() for t in camera_geometry(batch)]
    depths = torch.arange(1.0, 10.0, dtype=torch.float64)
    assert frustum_points_ego(*geometry, depths, 4, 11, 16).dtype == torch.float64
    points = [p.double() for p in batch["points"]]
    assert nearest_point_depth(points, *geometry, (4, 11), 16, lambda z: z > 0).dtype == torch.float64


def test_negative_nms_radii_are_a_config_error():
    import pydantic
    import pytest

    from bevkit.models.config import DetectionHeadConfig

    with pytest.raises(pydantic.ValidationError, match="nms_radii"):
        DetectionHeadConfig(nms_radii=(-1.0, 12.0, 10.0, 1.0, 0.85, 0.175))
