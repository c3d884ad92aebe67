"""BEVFormer's DETR head: Hungarian matching, set losses and NMS-free decoding."""

import math

import numpy as np
import pytest
import torch

from bevkit.models.config import DETRHeadConfig, GridConfig
from bevkit.models.heads.detr import DETRHead
from bevkit.models.matching import linear_sum_assignment

GRID = GridConfig(xbound=(-12.8, 12.8, 0.8), ybound=(-12.8, 12.8, 0.8), zbound=(-5.0, 3.0, 8.0))
CFG = DETRHeadConfig(num_queries=20, layers=2, dim=16, heads=4, points=2, ffn=32)
BOXES = torch.tensor([[3.0, -2.0, 0.5, 4.2, 1.8, 1.5, 0.3, 2.0, -0.5],
                      [-6.0, 4.0, 0.8, 0.6, 0.6, 1.7, -1.2, math.nan, math.nan],
                      [9.0, 9.5, 0.2, 0.4, 0.4, 0.9, 2.5, 0.0, 0.0]])
LABELS = torch.tensor([0, 8, 9])  # car, pedestrian, traffic cone
ATTRS = ["vehicle.moving", "pedestrian.standing", ""]


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4), (300, 12), (1, 1), (0, 3)])
def test_assignment_is_optimal_as_scipy(shape):
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(sum(shape))
    for cost in (rng.random(shape), np.round(rng.random(shape) * 3)):  # the second has many ties
        rows, cols = linear_sum_assignment(cost)
        r, c = scipy_opt.linear_sum_assignment(cost)
        assert len(rows) == len(r) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert cost[rows, cols].sum() == pytest.approx(cost[r, c].sum(), abs=1e-9)
    with pytest.raises(ValueError, match="NaN"):
        linear_sum_assignment(np.array([[0.0, np.nan]]))


def perfect_outputs(head: DETRHead, queries: list[int]) -> dict:
    """Outputs whose queries ``queries`` hold the three objects exactly, with high class scores."""
    layers, q, k = CFG.layers, CFG.num_queries, len(CFG.classes)
    cls = torch.full((layers, 1, q, k), -8.0)
    code = torch.zeros(layers, 1, q, 10)
    code[..., 3:6] = -1.0  # other queries: small boxes at the origin
    code[..., 7] = 1.0
    target = head._target_code(BOXES)
    attr = torch.zeros(layers, 1, q, len(CFG.attributes))
    for qi, box, lab, at in zip(queries, target, LABELS, ATTRS):
        cls[:, 0, qi, lab] = 6.0
        code[:, 0, qi] = torch.nan_to_num(box)
        if at:
            attr[:, 0, qi, CFG.attributes.index(at)] = 5.0
    return {"cls": cls, "code": code, "attr": attr}


def test_matching_finds_the_queries_that_hold_the_objects():
    head = DETRHead(16, GRID, CFG)
    out = perfect_outputs(head, [7, 2, 15])
    rows, cols = head.match(out["cls"][-1, 0], out["code"][-1, 0], LABELS, head._target_code(BOXES))
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 7, 1: 2, 2: 15}


def test_decoding_perfect_outputs_gives_back_every_box():
    head = DETRHead(16, GRID, CFG)
    out = perfect_outputs(head, [7, 2, 15])
    det = head.decode(out)[0]
    top = det["scores"].argsort(descending=True)[:3]
    order = top[det["labels"][top].argsort()]  # car, pedestrian, cone
    assert det["labels"][order].tolist() == LABELS.tolist()
    expected = BOXES.clone()
    expected[:, 6] = torch.atan2(torch.sin(expected[:, 6]), torch.cos(expected[:, 6]))
    got = det["boxes"][order]
    assert torch.allclose(got[:, :7], expected[:, :7], atol=1e-5)
    assert torch.allclose(got[0, 7:], expected[0, 7:]) and torch.allclose(got[2, 7:], expected[2, 7:])
    names = [CFG.attributes[a] if a >= 0 else "" for a in det["attributes"][order].tolist()]
    assert names == ATTRS  # the cone takes no attribute
    assert len(det["boxes"]) == min(CFG.max_boxes, CFG.num_queries * len(CFG.classes))


def test_losses_are_small_for_perfect_outputs_and_ignore_unknown_velocity():
    head = DETRHead(16, GRID, CFG)
    out = perfect_outputs(head, [7, 2, 15])
    terms = head.loss(out, [BOXES], [LABELS], [ATTRS])
    assert terms["det_reg"] < 1e-5 and terms["det_attr"] < 0.1
    bad = {k: v.clone() for k, v in out.items()}
    bad["code"][:, 0, 2, 8:] = 50.0  # the pedestrian's velocity is unknown: not supervised
    assert head.loss(bad, [BOXES], [LABELS], [ATTRS])["det_reg"] < 1e-5
    bad["code"][:, 0, 7, 8] = 3.0  # the car's is known: 1 m/s off, weight 0.2, two layers, three objects
    assert head.loss(bad, [BOXES], [LABELS], [ATTRS])["det_reg"] == pytest.approx(0.25 * 0.2 * 1.0 * 2 / 3, rel=1e-4)
    # A sample without objects: every query is a negative, no regression.
    empty = head.loss(out, [BOXES[:0]], [LABELS[:0]], [[]])
    assert empty["det_cls"] > terms["det_cls"] and empty["det_reg"] == 0


def test_forward_refines_reference_points_inside_the_grid():
    torch.manual_seed(0)
    head = DETRHead(8, GRID, CFG)
    out = head(torch.randn(2, 8, 32, 32))
    centres = out["code"][..., :3]
    assert out["cls"].shape == (2, 2, 20, 10) and out["code"].shape == (2, 2, 20, 10)
    assert (centres[..., 0].abs() <= 12.8).all() and (centres[..., 1].abs() <= 12.8).all()
    assert (centres[..., 2] >= -5).all() and (centres[..., 2] <= 3).all()
