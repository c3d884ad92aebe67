"""Heads: targets, losses and decoding checked against known answers."""

import math

import pytest
import torch
from tiny_batch import ATTRIBUTES, BOXES, LABELS

from bevkit.models.config import (
    DetectionHeadConfig,
    GridConfig,
    MapHeadConfig,
    OccupancyHeadConfig,
)
from bevkit.models.heads import CenterHead, MapSegHead, OccupancyHead
from bevkit.models.heads.detection import BRANCHES, gaussian_focal_loss, gaussian_radius

GRID = GridConfig(xbound=(-12.8, 12.8, 0.8), ybound=(-12.8, 12.8, 0.8), zbound=(-5.0, 3.0, 8.0))


def _perfect_outputs(head: CenterHead, boxes, labels, attributes):
    """Head outputs equal to the targets: heatmap logits of the gaussians, the code and the
    attribute at each centre."""
    tgts = head.targets(boxes, labels, attributes)
    ny, nx = GRID.shape
    outs = []
    for tgt in tgts:
        b = tgt["heatmap"].shape[0]
        out = {"heatmap": torch.logit(tgt["heatmap"].clamp(1e-6, 1 - 1e-6))}
        attr = torch.zeros(b, len(head.cfg.attributes), ny * nx)
        code = torch.zeros(b, 10, ny * nx)
        for i in range(b):
            valid = tgt["mask"][i, :, 0] > 0
            code[i][:, tgt["index"][i][valid]] = tgt["code"][i][valid].T
            has = valid & (tgt["attr"][i] >= 0)
            attr[i, tgt["attr"][i][has], tgt["index"][i][has]] = 10.0
        code = code.view(b, 10, ny, nx)
        if "attr" in head.tasks[len(outs)].branches:  # this group takes attributes
            out["attr"] = attr.view(b, -1, ny, nx)
        start = 0
        for name, c in BRANCHES.items():
            out[name] = code[:, start: start + c]
            start += c
        outs.append(out)
    return outs


def test_decode_of_perfect_outputs_gives_back_the_boxes():
    head = CenterHead(8, GRID, DetectionHeadConfig(channels=8))
    boxes = [torch.tensor(b) for b in BOXES]
    labels = [torch.tensor(lb) for lb in LABELS]
    dets = head.decode(_perfect_outputs(head, boxes, labels, ATTRIBUTES))
    for det, gt, gl, ga in zip(dets, boxes, labels, ATTRIBUTES):
        assert det["boxes"].shape == (len(gt), 9)
        torch.testing.assert_close(det["scores"], torch.ones(len(gt)), atol=1e-5, rtol=0)
        for box, label, attribute in zip(gt, gl, ga):
            k = int(((det["boxes"][:, :2] - box[:2]).norm(dim=1)).argmin())
            assert int(det["labels"][k]) == int(label)
            a = int(det["attributes"][k])
            if attribute:
                assert head.cfg.attributes[a] == attribute
            elif head.cfg.classes[int(label)] in ("barrier", "traffic_cone"):
                assert a == -1
            known = torch.isfinite(box)
            got = det["boxes"][k]
            # yaw is compared through sin and cos (decoded in (-pi, pi])
            torch.testing.assert_close(got[known][:6], box[known][:6], atol=1e-4, rtol=1e-4)
            assert abs(math.remainder(float(got[6] - box[6]), 2 * math.pi)) < 1e-4
            torch.testing.assert_close(got[7:][known[7:]], box[7:][known[7:]], atol=1e-5, rtol=0)


def test_heatmap_targets_peak_at_the_centre_cell_with_the_class_channel():
    head = CenterHead(8, GRID, DetectionHeadConfig(channels=8))
    tgt = head.targets([torch.tensor([[0.1, -0.1, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]])], [torch.tensor([0])])[0]
    heat = tgt["heatmap"][0, 0]
    assert float(heat.max()) == 1.0
    assert (heat == 1).nonzero().tolist() == [[15, 16]]  # x = 0.1 -> ix 16, y = -0.1 -> iy 15
    # radius: CenterPoint's gaussian_radius on 5 x 2.5 cells at overlap 0.1, floored, at least 2
    r = max(2, int(gaussian_radius(torch.tensor([5.0]), torch.tensor([2.5]), 0.1)))
    assert int((heat[15] > 0).sum()) == 2 * r + 1
    torch.testing.assert_close(tgt["code"][0, 0, :2], torch.tensor([0.125, 0.875]))


def test_focal_loss_rewards_the_target():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 4] = 1.0
    good = torch.logit(target.clamp(0.01, 0.99))
    assert gaussian_focal_loss(good, target) < 0.01 < gaussian_focal_loss(-good, target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_focal_loss_is_finite_in_half_precision(dtype):
    # Confident logits (|x| > 6) saturate the sigmoid in 16-bit floats: the loss must stay finite and
    # equal the float32 loss, as under autocast where the head's convolutions return bf16 / fp16.
    target = torch.zeros(1, 2, 8, 8)
    target[0, 0, 3, 4] = 1.0
    logits = torch.full((1, 2, 8, 8), -12.0)
    logits[0, 0, 3, 4] = 12.0
    logits[0, 1, 5, 5] = 9.0  # a confident false positive
    half = gaussian_focal_loss(logits.to(dtype), target.to(dtype))
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, gaussian_focal_loss(logits, target), rtol=1e-2, atol=1e-6)


def test_map_loss_and_decode():
    head = MapSegHead(8, MapHeadConfig(channels=8, upsample=2))
    assert head(torch.zeros(2, 8, 5, 10)).shape == (2, 4, 10, 20)
    target = (torch.rand(2, 4, 10, 20, generator=torch.Generator().manual_seed(0)) > 0.7).to(torch.uint8)
    good = (target.float() * 2 - 1) * 8
    assert head.loss(good, target)["map_bce"] < 0.01
    assert head.loss(good, target)["map_dice"] < 0.01
    assert head.loss(-good, target)["map_dice"] > 0.9
    assert torch.equal(head.decode(good), target.bool())


def test_occupancy_layout_loss_mask_and_decode():
    cfg = OccupancyHeadConfig(channels=8, nz=3)
    head = OccupancyHead(8, cfg)
    logits = head(torch.zeros(1, 8, 5, 4))  # (B, C, Y, X)
    assert logits.shape == (1, 18, 3, 5, 4)
    occ = torch.randint(0, 18, (1, 4, 5, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)  # (X, Y, Z)
    onehot = torch.nn.functional.one_hot(occ.long().permute(0, 3, 2, 1), 18).permute(0, 4, 1, 2, 3).float() * 20
    assert torch.equal(head.decode(onehot), occ)
    assert head.loss(onehot, occ)["occ_ce"] < 1e-6
    # A wrong prediction where the cameras do not look costs nothing.
    mask = torch.ones_like(occ)
    mask[0, 0, 0, 0] = 0
    spoiled = onehot.clone()
    spoiled[0, :, 0, 0, 0] = spoiled[0, :, 0, 0, 0].roll(1)  # voxel (x=0, y=0, z=0)
    assert head.loss(spoiled, occ, mask)["occ_ce"] < 1e-6
    assert head.loss(spoiled, occ)["occ_ce"] > 0.1


def test_occupancy_labels_finer_than_the_prediction_are_read_at_voxel_centres():
    head = OccupancyHead(8, OccupancyHeadConfig(channels=8, nz=2))
    logits = torch.zeros(1, 18, 2, 3, 5)  # (B, K, Z, Y, X)
    occ = torch.zeros(1, 20, 12, 8, dtype=torch.uint8)  # (X, Y, Z), 4x finer
    # coarse voxel (x=1, y=2, z=1) is read at fine voxel (4 + 2, 8 + 2, 4 + 2)
    occ[0, 6, 10, 6] = 5
    onehot = torch.nn.functional.one_hot(head._at_prediction(occ.permute(0, 3, 2, 1), logits).long(), 18)
    assert onehot.shape == (1, 2, 3, 5, 18)
    assert int(onehot[0, 1, 2, 1].argmax()) == 5 and int(onehot[..., 5].sum()) == 1
    good = onehot.permute(0, 4, 1, 2, 3).float() * 20
    assert head.loss(good, occ)["occ_ce"] < 1e-6
    assert torch.equal(head.decode(good, (4, 4, 4))[0, 4:8, 8:12, 4:8], torch.full((4, 4, 4), 5, dtype=torch.uint8))
    assert torch.equal(head.decode_to(good, occ.shape[1:]), head.decode(good, (4, 4, 4)))
    with pytest.raises(ValueError, match="integer multiple"):
        head.decode_to(good, (18, 12, 8))
    with pytest.raises(ValueError, match="integer multiple"):
        head.loss(logits, occ[:, :18])


def test_attribute_vocabulary_matches_the_evaluation():
    from bevkit.eval.detection import ATTRIBUTES as EVAL_ATTRIBUTES

    assert set(DetectionHeadConfig().attributes) == set(EVAL_ATTRIBUTES)
    head = CenterHead(8, GRID, DetectionHeadConfig(channels=8))
    assert [("attr" in t.branches) for t in head.tasks] == [True, True, True, False, True, True]


def test_circle_nms_radii_are_centerpoints_squared_distance_thresholds():
    """CenterPoint suppresses a centre when dx**2 + dy**2 <= min_radius (car 4, pedestrian 0.175): two cars
    2.6 m apart are both kept (6.76 > 4), two at 1.9 m are one; two pedestrians 0.3 m apart are one
    (0.09 <= 0.175), at 0.5 m two."""
    from bevkit.models.config import CENTERPOINT_NMS_RADII, CENTERPOINT_TASKS
    from bevkit.ops import circle_nms

    car = CENTERPOINT_NMS_RADII[CENTERPOINT_TASKS.index(("car",))] ** 0.5  # as the head passes them
    ped = CENTERPOINT_NMS_RADII[CENTERPOINT_TASKS.index(("pedestrian", "traffic_cone"))] ** 0.5
    scores = torch.tensor([0.9, 0.8])
    for gap, radius, kept in ((2.6, car, 2), (1.9, car, 1), (0.3, ped, 1), (0.5, ped, 2)):
        centres = torch.tensor([[10.0, 5.0], [10.0, 5.0 + gap]])
        assert len(circle_nms(centres, scores, radius)) == kept, (gap, radius)


def test_centerhead_passes_the_square_roots_of_its_radii(monkeypatch):
    from pathlib import Path

    from tiny_batch import make_batch

    import bevkit.models.heads.detection as detection
    from bevkit.models import build_model, load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "pointpillars-synth.yaml")
    model = build_model(cfg).eval()
    passed = []
    real = detection.circle_nms
    monkeypatch.setattr(detection, "circle_nms", lambda c, s, r, groups=None: passed.append(r) or real(c, s, r, groups))
    with torch.no_grad():
        model.decode(model(make_batch(cfg, n_cams=1, batch=1)))
    expected = [r ** 0.5 for r in cfg.heads.detection.nms_radii]
    assert passed == pytest.approx(expected)
