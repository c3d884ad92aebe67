import math

import pytest
import torch

from bevkit.ops import (
    bev_corners,
    circle_nms,
    circle_nms_reference,
    nms_rotated,
    nms_rotated_reference,
    rotated_iou_bev,
    rotated_iou_bev_aligned,
)


def _boxes(n, seed=0, extent=20.0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    boxes = u * torch.tensor([extent, extent, 4.0, 2.0, 2 * math.pi], dtype=torch.float64)
    boxes[:, 2:4] += 0.5
    return boxes, torch.rand(n, generator=gen, dtype=torch.float64)


def test_corners_hand_computed():
    box = torch.tensor([[1.0, 2.0, 4.0, 2.0, math.pi / 2]], dtype=torch.float64)
    # Heading along +y: the front corners are at y = 2 + 2, the left side at x = 1 - 1.
    expected = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [2.0, 0.0], [2.0, 4.0]]], dtype=torch.float64)
    torch.testing.assert_close(bev_corners(box), expected)


def test_iou_against_shapely():
    shapely = pytest.importorskip("shapely.geometry")
    boxes, _ = _boxes(40, extent=6.0)
    iou = rotated_iou_bev(boxes, boxes)
    polys = [shapely.Polygon(c.tolist()) for c in bev_corners(boxes)]
    expected = torch.tensor([[p.intersection(q).area / p.union(q).area for q in polys] for p in polys],
                            dtype=torch.float64)
    assert (expected > 0.05).sum() > 80  # plenty of real overlaps
    torch.testing.assert_close(iou, expected, rtol=1e-9, atol=1e-9)
    shifted = torch.arange(40).roll(1)
    torch.testing.assert_close(rotated_iou_bev_aligned(boxes, boxes[shifted]), expected[torch.arange(40), shifted])


def test_iou_special_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0, math.pi / 2],   # same square rotated: IoU 1
                      [1.0, 0.0, 2.0, 2.0, 0.0],           # half overlap: 2 / 6
                      [5.0, 5.0, 1.0, 1.0, 0.3],           # disjoint
                      [0.0, 0.0, 2 * math.sqrt(2), 2 * math.sqrt(2), math.pi / 4]],  # rotated cover
                     dtype=torch.float64)
    iou = rotated_iou_bev(a, b)[0]
    torch.testing.assert_close(iou[:3], torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64))
    # Intersection of the unit square with a diamond circumscribing it: the square, area 4 / 8.
    torch.testing.assert_close(iou[3], torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("threshold", [0.01, 0.2, 0.5])
@pytest.mark.parametrize("grouped", [False, True])
def test_rotated_nms_matches_reference(threshold, grouped):
    boxes, scores = _boxes(150, seed=1)
    groups = torch.randint(0, 3, (150,), generator=torch.Generator().manual_seed(2)) if grouped else None
    got = nms_rotated(boxes, scores, threshold, groups, chunk=64)
    expected = nms_rotated_reference(boxes, scores, threshold, groups)
    assert torch.equal(got, expected)
    assert 0 < len(got) < 150


def test_rotated_nms_batch_as_groups_and_edge_cases():
    boxes, scores = _boxes(30, seed=4)
    both = torch.cat((boxes, boxes))
    batch = torch.cat((torch.zeros(30, dtype=torch.long), torch.ones(30, dtype=torch.long)))
    single = nms_rotated(boxes, scores, 0.1)
    batched = nms_rotated(both, torch.cat((scores, scores)), 0.1, batch)
    assert sorted(batched.tolist()) == sorted(single.tolist() + (single + 30).tolist())
    assert nms_rotated(boxes[:0], scores[:0], 0.1).numel() == 0
    same = boxes[:1].expand(5, 5)
    assert nms_rotated(same, torch.arange(5.0), 0.5).tolist() == [4]  # all but the best suppressed
    assert nms_rotated(boxes[:1], scores[:1], 0.5).tolist() == [0]


@pytest.mark.parametrize("grouped", [False, True])
def test_circle_nms_matches_reference(grouped):
    boxes, scores = _boxes(400, seed=5)
    groups = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(6)) if grouped else None
    got = circle_nms(boxes[:, :2], scores, 1.5, groups, chunk=128)
    expected = circle_nms_reference(boxes[:, :2], scores, 1.5, groups)
    assert torch.equal(got, expected)
    assert 0 < len(got) < 400
    assert circle_nms(boxes[:0, :2], scores[:0], 1.0).numel() == 0
