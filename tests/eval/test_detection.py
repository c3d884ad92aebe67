"""The vectorised detection metric on hand-built and random cases (no dataset, no devkit)."""

import math

import numpy as np
import pytest

from bevkit.eval.detection import (CLASS_INDEX, CLASSES, NELEM, DetBoxes, Racks, calc_ap, calc_tp, evaluate_boxes,
                                   filter_mask, match)

NO_RACKS = Racks(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 4)))


def boxes(sample, xy, label, score=None, yaw=None, size=None, attr=None, velocity=None, num_pts=None):
    n = len(sample)
    xy = np.asarray(xy, float).reshape(n, 2)
    return DetBoxes(sample=np.asarray(sample, np.int64), translation=np.c_[xy, np.zeros(n)],
                    size=np.ones((n, 3)) if size is None else np.asarray(size, float),
                    yaw=np.zeros(n) if yaw is None else np.asarray(yaw, float),
                    velocity=np.zeros((n, 2)) if velocity is None else np.asarray(velocity, float),
                    label=np.asarray(label, np.int64), score=np.ones(n) if score is None else np.asarray(score, float),
                    attr=np.full(n, -1) if attr is None else np.asarray(attr, np.int64),
                    num_pts=np.full(n, 5) if num_pts is None else np.asarray(num_pts, np.int64))


def reference_match(gt: DetBoxes, pred: DetBoxes, c: int, th: float):
    """algo.py accumulate's loop, box by box: the definition the vectorised rounds must reproduce."""
    idx = [i for i in range(len(pred)) if pred.label[i] == c]
    order = [i for (_, i) in sorted((pred.score[i], i) for i in idx)][::-1]
    taken, tp, matched = set(), [], []
    for p in order:
        best, best_g = np.inf, None
        for g in range(len(gt)):
            if gt.sample[g] == pred.sample[p] and gt.label[g] == c and g not in taken:
                d = np.linalg.norm(pred.translation[p, :2] - gt.translation[g, :2])
                if d < best:
                    best, best_g = d, g
        if best < th:
            taken.add(best_g)
            tp.append(True)
            matched.append(best_g)
        else:
            tp.append(False)
            matched.append(-1)
    return order, tp, matched


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matching_equals_the_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    ng, npred = 60, 150
    # Few samples and classes, coarse positions and scores: crowded groups and many exact ties.
    gt = boxes(rng.integers(0, 3, ng), np.round(rng.uniform(0, 8, (ng, 2)), 0), rng.integers(0, 3, ng))
    pred = boxes(rng.integers(0, 3, npred), np.round(rng.uniform(0, 8, (npred, 2)) * 2, 0) / 2,
                 rng.integers(0, 3, npred), score=np.round(rng.uniform(size=npred), 1))
    ths = [0.5, 1.0, 2.0, 4.0]
    got = match(gt, pred, ths)
    n_tp = 0
    for c in range(3):
        for th in ths:
            order, tp, matched = reference_match(gt, pred, c, th)
            m = got[(c, th)]
            assert m.pred.tolist() == order
            assert m.tp.tolist() == tp
            assert m.gt.tolist() == matched
            n_tp += sum(tp)
    assert n_tp > 50


def test_perfect_predictions_score_one_and_missing_classes_zero():
    gt = boxes([0, 0, 1], [[1, 1], [5, 5], [2, 3]], [CLASS_INDEX["car"]] * 2 + [CLASS_INDEX["barrier"]])
    ego = np.zeros((2, 3))
    r = evaluate_boxes(gt, gt, ego, NO_RACKS).summary
    assert r["label_aps"]["car"] == pytest.approx({0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0})
    assert r["label_aps"]["barrier"][0.5] == pytest.approx(1.0)
    assert r["label_aps"]["truck"][4.0] == 0.0                    # no GT: no-predictions curve
    assert r["label_tp_errors"]["car"]["trans_err"] == 0.0
    assert r["label_tp_errors"]["truck"]["trans_err"] == 1.0
    assert math.isnan(r["label_tp_errors"]["barrier"]["vel_err"])  # excluded for barriers
    assert r["mean_ap"] == pytest.approx(2 / 10)


def test_barrier_orientation_has_a_period_of_pi():
    gt = boxes([0, 0], [[1, 1], [9, 9]], [CLASS_INDEX["barrier"], CLASS_INDEX["car"]], yaw=[0.0, 0.0])
    pred = boxes([0, 0], [[1, 1], [9, 9]], [CLASS_INDEX["barrier"], CLASS_INDEX["car"]], yaw=[np.pi, np.pi])
    r = evaluate_boxes(gt, pred, np.zeros((1, 3)), NO_RACKS).summary["label_tp_errors"]
    assert r["barrier"]["orient_err"] == pytest.approx(0.0, abs=1e-12)
    assert r["car"]["orient_err"] == pytest.approx(np.pi)


def test_filters_drop_far_empty_and_racked_boxes():
    car, bike = CLASS_INDEX["car"], CLASS_INDEX["bicycle"]
    b = boxes([0, 0, 0, 0, 0], [[49.9, 0], [0, 50.0], [3, 3], [10, 0.2], [10, 3]], [car, car, car, bike, bike],
              num_pts=[1, 1, 0, -1, -1])
    rack = Racks(np.array([0]), np.array([[10.0, 0.0, 0.0]]), np.array([[2.0, 1.0, 1.0]]),  # w=2 across y
                 np.array([[1.0, 0.0, 0.0, 0.0]]))
    assert filter_mask(b, np.zeros((1, 3)), rack).tolist() == [True, False, False, False, True]


def test_ap_and_tp_from_hand_curves():
    md = {"precision": np.r_[np.ones(51), np.zeros(50)], "confidence": np.r_[np.linspace(1, 0.5, 51), np.zeros(50)],
          "trans_err": np.full(NELEM, 0.25)}
    # Precision 1 up to recall 0.5: (40 bins of 0.9) / 90 bins / 0.9.
    assert calc_ap(md, 0.1, 0.1) == pytest.approx(40 * 0.9 / 90 / 0.9)
    assert calc_tp(md, 0.1, "trans_err") == pytest.approx(0.25)
    assert calc_tp({**md, "confidence": np.r_[np.ones(5), np.zeros(96)]}, 0.1, "trans_err") == 1.0
    assert len(CLASSES) == 10


def test_no_predictions_at_all_scores_zero():
    """The devkit raises on a results file without a single box; bevkit scores it: mAP 0, NDS 0."""
    gt = boxes([0, 1], [[1, 1], [2, 2]], [CLASS_INDEX["car"], CLASS_INDEX["pedestrian"]])
    r = evaluate_boxes(gt, DetBoxes.empty(), np.zeros((2, 3)), NO_RACKS).summary
    assert r["mean_ap"] == 0.0 and r["nd_score"] == 0.0
    assert r["tp_errors"]["trans_err"] == 1.0
    r = evaluate_boxes(DetBoxes.empty(), gt, np.zeros((2, 3)), NO_RACKS).summary   # no GT at all
    assert r["mean_ap"] == 0.0
