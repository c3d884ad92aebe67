"""Map IoU and occupancy mIoU against hand-computed values, streaming and merging exactly."""

import math

import pytest
import torch

from bevkit.eval.map_seg import MapIoU, masks_from_logits
from bevkit.eval.occupancy import OCC_CLASSES, OccupancyMIoU


def test_map_iou_hand_case_with_an_empty_class():
    pred = torch.zeros(1, 3, 2, 4, dtype=torch.bool)
    gt = torch.zeros(1, 3, 2, 4, dtype=torch.bool)
    pred[0, 0, 0, :3] = True          # divider: 3 predicted
    gt[0, 0, 0, 1:] = True            # 3 true, 2 shared: IoU 2/4
    gt[0, 1, 1, 0] = True             # ped_crossing: missed entirely: 0/1
    # boundary: nothing anywhere -> NaN, not in the mean
    m = MapIoU()
    m.update(pred, gt)
    r = m.compute()
    assert r["divider"] == 0.5 and r["ped_crossing"] == 0.0 and math.isnan(r["boundary"])
    assert r["mIoU"] == 0.25


def test_map_iou_accumulates_counts_not_per_batch_means():
    m = MapIoU()
    a = torch.zeros(1, 3, 1, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :, 0, 0] = True
    b[0, :, 0, 0] = True              # batch 1: 1/1 for every class
    c = torch.zeros(1, 3, 1, 4, dtype=torch.bool)
    d = c.clone()
    c[0, :, 0, :] = True              # batch 2: 0/4 (prediction everywhere, no GT)
    m.update(a, b)
    m.update(c, d)
    assert m.compute()["divider"] == pytest.approx(1 / 5)   # (1 + 0) / (1 + 4), not mean(1, 0)


def test_masks_from_logits_is_argmax_without_background():
    logits = torch.tensor([[5.0, 0.0], [1.0, 3.0], [0.0, 1.0], [0.0, 4.0]]).view(1, 4, 1, 2)
    masks = masks_from_logits(logits)
    assert masks.shape == (1, 3, 1, 2)
    assert masks[0, :, 0, 0].tolist() == [False, False, False]   # background wins
    assert masks[0, :, 0, 1].tolist() == [False, False, True]    # boundary (channel 3) wins


def test_occupancy_hand_case_camera_mask_free_and_empty_classes():
    gt = torch.tensor([4, 4, 4, 17, 17, 0, 255, 4]).view(1, 2, 2, 2)
    pred = torch.tensor([4, 4, 17, 4, 17, 1, 4, 0]).view(1, 2, 2, 2)
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool).view(1, 2, 2, 2)
    m = OccupancyMIoU()
    m.update(pred, gt, mask)
    r = m.compute()
    # car (4): TP 2, FN 1 (predicted free), FP 1 (free predicted as car); the 255 voxel and the
    # voxel outside the camera mask do not count.
    assert r["car"] == pytest.approx(2 / 4)
    assert r["others"] == 0.0 and r["barrier"] == 0.0     # GT others predicted as barrier
    assert math.isnan(r["bus"]) and "free" not in r
    assert r["mIoU"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert list(r)[:17] == list(OCC_CLASSES[:17])


def test_merge_of_halves_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 18, (4, 8, 8, 4), generator=g)
    gt = torch.randint(0, 18, (4, 8, 8, 4), generator=g)
    mask = torch.rand(4, 8, 8, 4, generator=g) > 0.3
    whole, a, b = OccupancyMIoU(), OccupancyMIoU(), OccupancyMIoU()
    whole.update(pred, gt, mask)
    a.update(pred[:2], gt[:2], mask[:2])
    b.update(pred[2:], gt[2:], mask[2:])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    mp, mg = torch.rand(4, 3, 8, 8, generator=g) > 0.5, torch.rand(4, 3, 8, 8, generator=g) > 0.5
    mw, m1, m2 = MapIoU(), MapIoU(), MapIoU()
    mw.update(mp, mg)
    m1.update(mp[:1], mg[:1])
    m2.update(mp[1:], mg[1:])
    assert m1.merge(m2).compute() == mw.compute()


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        MapIoU().update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="predicted labels"):
        OccupancyMIoU().update(torch.full((1, 2, 2, 2), 18), torch.zeros(1, 2, 2, 2, dtype=torch.long))
