"""Merging across processes (torch.distributed, gloo on CPU) gives exactly the one-process figures."""

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bevkit.eval.detection import DetBoxes, Racks
from bevkit.eval.groundtruth import DetectionGT

N_SAMPLES = 6


def make_gt() -> DetectionGT:
    rng = np.random.default_rng(0)
    n = 80
    boxes = DetBoxes(sample=rng.integers(0, N_SAMPLES, n), translation=rng.uniform(-20, 20, (n, 3)),
                     size=rng.uniform(0.5, 3, (n, 3)), yaw=rng.uniform(-3, 3, n), velocity=rng.normal(0, 2, (n, 2)),
                     label=rng.integers(0, 10, n), score=np.full(n, -1.0), attr=rng.integers(-1, 8, n),
                     num_pts=rng.integers(0, 4, n))
    racks = Racks(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 4)))
    return DetectionGT([f"s{i}" for i in range(N_SAMPLES)], np.zeros((N_SAMPLES, 3)),
                       np.repeat(np.eye(4)[None], N_SAMPLES, 0), boxes, racks)


def predictions(gt: DetectionGT, i: int):
    """Jittered GT of sample i as ego-frame (x, y, z, l, w, h, yaw, vx, vy), scores, bevkit labels."""
    from bevkit.data.nuscenes import DETECTION_CLASSES
    from bevkit.eval.detection import CLASSES

    rng = np.random.default_rng(100 + i)
    b = gt.boxes.take(gt.boxes.sample == i)
    m = len(b)
    rows = np.c_[b.translation + rng.normal(0, 0.5, (m, 3)), b.size[:, [1, 0, 2]], b.yaw + rng.normal(0, 0.3, m),
                 b.velocity + rng.normal(0, 0.5, (m, 2))]
    labels = [DETECTION_CLASSES.index(CLASSES[c]) for c in b.label]
    return torch.tensor(rows), torch.tensor(rng.uniform(size=m)), torch.tensor(labels, dtype=torch.long)


def voxels():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 18, (4, 6, 6, 3), generator=g), torch.randint(0, 18, (4, 6, 6, 3), generator=g),
            torch.rand(4, 6, 6, 3, generator=g) > 0.4, torch.rand(4, 3, 8, 8, generator=g) > 0.5,
            torch.rand(4, 3, 8, 8, generator=g) > 0.5)


def evaluate(rank: int, world: int):
    from bevkit.eval.evaluator import DetectionEvaluator, gather_detections
    from bevkit.eval.map_seg import MapIoU
    from bevkit.eval.occupancy import OccupancyMIoU

    gt = make_gt()
    ev, occ, seg = DetectionEvaluator(gt), OccupancyMIoU(), MapIoU()
    for i in range(rank, N_SAMPLES, world):   # interleaved shares, so the merge must restore the order
        ev.add(f"s{i}", *predictions(gt, i))
    pred, target, mask, mp_, mg = voxels()
    occ.update(pred[rank::world], target[rank::world], mask[rank::world])
    seg.update(mp_[rank::world], mg[rank::world])
    gather_detections(ev)
    occ.sync()
    seg.sync()
    s = ev.compute().summary
    return {"det": {k: s[k] for k in ("mean_ap", "nd_score", "tp_errors")}, "occ": occ.compute(), "map": seg.compute(),
            "confusion": occ.confusion.tolist()}


def _worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = evaluate(rank, world)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one(tmp_path):
    single = json.loads(json.dumps(evaluate(0, 1)))
    assert 0.05 < single["det"]["mean_ap"] < 0.95
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            assert same(json.load(f), single)
