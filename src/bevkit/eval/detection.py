"""The nuScenes detection benchmark (mAP, TP errors, NDS), as the devkit defines it, vectorised.

Every definition follows the nuScenes devkit 1.2.0 (``nuscenes/eval/detection/algo.py``,
``nuscenes/eval/common/loaders.py``, ``utils.py``, ``data_classes.py``); the comments name the devkit
function each step reproduces. Boxes live in the *global* frame here, as in the devkit.

Flow::

    DetBoxes (GT, predictions)  --filter_mask-->  kept boxes
        --match-->  per (class, threshold): TP flags in score order, matched GT, match errors
        --metric_data-->  101-point curves (recall, precision, confidence, TP errors)
        --summarize-->  label_aps, label_tp_errors, mean_ap, tp_errors, tp_scores, nd_score
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

# The `detection_cvpr_2019` configuration (nuscenes/eval/detection/configs/detection_cvpr_2019.json).
# Class order is the devkit's DETECTION_NAMES (nuscenes/eval/detection/constants.py); it orders the
# classes in every output, as in the devkit's metrics_summary.json.
DETECTION_CVPR_2019 = {
    "class_range": {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
                    "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30},
    "dist_fcn": "center_distance",
    "dist_ths": [0.5, 1.0, 2.0, 4.0],
    "dist_th_tp": 2.0,
    "min_recall": 0.1,
    "min_precision": 0.1,
    "max_boxes_per_sample": 500,
    "mean_ap_weight": 5,
}
CLASSES = tuple(DETECTION_CVPR_2019["class_range"])


def detection_config(max_range: float | None = None) -> dict:
    """``detection_cvpr_2019``, or with every class range capped at ``max_range`` metres (xy distance to
    the ego): for a model whose BEV grid covers less than the benchmark's 30-50 m. A capped configuration
    is not the benchmark; it is recorded under ``cfg`` in ``metrics_summary.json`` and printed with the
    table."""
    cfg = copy.deepcopy(DETECTION_CVPR_2019)  # a copy: editing it never changes the benchmark's definition
    if max_range is None:
        return cfg
    if not max_range > 0:
        raise ValueError(f"max_range must be positive, got {max_range}")
    cfg["class_range"] = {c: min(r, max_range) for c, r in DETECTION_CVPR_2019["class_range"].items()}
    return cfg
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
# nuscenes/eval/detection/constants.py: ATTRIBUTE_NAMES and TP_METRICS.
ATTRIBUTES = ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing", "cycle.with_rider",
              "cycle.without_rider", "vehicle.moving", "vehicle.parked", "vehicle.stopped")
ATTRIBUTE_INDEX = {name: i for i, name in enumerate(ATTRIBUTES)}
TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
# evaluate.py DetectionEval.evaluate: TP errors that are undefined for a class (reported as NaN).
TP_EXCLUDED = {"traffic_cone": ("attr_err", "vel_err", "orient_err"), "barrier": ("attr_err", "vel_err")}
# The barrier's orientation is only defined up to 180 degrees (algo.py accumulate).
ORIENT_PERIOD = {"barrier": np.pi}
BIKE_CLASSES = ("bicycle", "motorcycle")  # loaders.py filter_eval_boxes: the bike-rack filter applies to these
NELEM = 101  # DetectionMetricData.nelem: recall sampled at 0, 0.01, ..., 1


@dataclass
class DetBoxes:
    """Boxes of many samples as flat arrays, in the global frame (the devkit's ``EvalBoxes``).

    Shapes (N boxes):
        sample (N,) int: index into the sample list   translation (N, 3)   size (N, 3) as [w, l, h]
        yaw (N,): devkit's quaternion_yaw of the rotation   velocity (N, 2) (NaN where unknown, GT only)
        label (N,) int: index into CLASSES   score (N,)   attr (N,) int: index into ATTRIBUTES, -1 for ''
        num_pts (N,) int: LiDAR + radar points (GT); -1 for predictions unless the file gives it
    """

    sample: np.ndarray
    translation: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    label: np.ndarray
    score: np.ndarray
    attr: np.ndarray
    num_pts: np.ndarray

    def __len__(self):
        return len(self.sample)

    def take(self, index) -> "DetBoxes":
        return DetBoxes(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})

    @classmethod
    def empty(cls) -> "DetBoxes":
        return cls(np.zeros(0, np.int64), np.zeros((0, 3)), np.ones((0, 3)), np.zeros(0), np.zeros((0, 2)),
                   np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts) -> "DetBoxes":
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})


def quat_yaw(q) -> np.ndarray:
    """The devkit's ``quaternion_yaw`` (heading of the rotated x axis) of [w, x, y, z] quaternions.

    Shapes:
        q: (N, 4)   returns: (N,)
    """
    from bevkit.geometry import quat_to_yaw

    return np.asarray(quat_to_yaw(np.asarray(q, dtype=np.float64).reshape(-1, 4)), dtype=np.float64)


@dataclass
class Racks:
    """Bicycle-rack annotation boxes (global frame) for the bike-rack filter.

    Shapes: sample (K,)   translation (K, 3)   size (K, 3) as [w, l, h]   rotation (K, 4) [w, x, y, z]
    """

    sample: np.ndarray
    translation: np.ndarray
    size: np.ndarray
    rotation: np.ndarray


def _group_pairs(key_a, key_b):
    """All pairs (i, j) with key_a[i] == key_b[j], i ascending, then j in key_b order.

    Shapes: key_a (A,), key_b (B,) int   returns: ia (K,), jb (K,)
    """
    order_b = np.argsort(key_b, kind="stable")
    sorted_b = key_b[order_b]
    lo = np.searchsorted(sorted_b, key_a, side="left")
    hi = np.searchsorted(sorted_b, key_a, side="right")
    count = hi - lo
    ia = np.repeat(np.arange(len(key_a)), count)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
    jb = order_b[np.arange(len(ia)) + starts]
    return ia, jb


def in_bike_rack(boxes: DetBoxes, racks: Racks) -> np.ndarray:
    """Which boxes have their centre inside a bicycle rack of their sample (loaders.py filter_eval_boxes,
    with geometry_utils.points_in_box: the box corners' edge vectors, bounds inclusive).

    Shapes: returns (N,) bool
    """
    inside = np.zeros(len(boxes), bool)
    if len(racks.sample) == 0 or len(boxes) == 0:
        return inside
    ib, ir = _group_pairs(boxes.sample, racks.sample)
    if len(ib) == 0:
        return inside
    from bevkit.geometry import quat_to_matrix

    w, l, h = racks.size[ir].T
    rot = quat_to_matrix(racks.rotation[ir])                       # (K, 3, 3)
    # Corners 0 (+l, +w, +h)/2, 4 (-l, +w, +h)/2, 1 (+l, -w, +h)/2, 3 (+l, +w, -h)/2 (Box.corners).
    local = np.stack([np.stack([l, -l, l, l], 1), np.stack([w, w, -w, w], 1), np.stack([h, h, h, -h], 1)], 1) / 2
    corners = np.einsum("kij,kjc->kic", rot, local) + racks.translation[ir][:, :, None]   # (K, 3, 4)
    p1 = corners[:, :, 0]
    axes = corners[:, :, 1:] - p1[:, :, None]                      # i, j, k as columns (K, 3, 3)
    v = boxes.translation[ib] - p1                                 # (K, 3)
    proj = np.einsum("kic,ki->kc", axes, v)
    lim = np.einsum("kic,kic->kc", axes, axes)
    hit = np.all((proj >= 0) & (proj <= lim), axis=1)
    np.logical_or.at(inside, ib[hit], True)
    return inside


def filter_mask(boxes: DetBoxes, ego_translation: np.ndarray, racks: Racks, cfg=DETECTION_CVPR_2019) -> np.ndarray:
    """The devkit's ``filter_eval_boxes``: class range (xy distance to the LIDAR_TOP ego pose), zero
    LiDAR+radar points, and bicycles/motorcycles inside a bicycle rack.

    Shapes: ego_translation (S, 3) per sample   returns: (N,) bool, True = kept
    """
    rng = np.array([cfg["class_range"][c] for c in CLASSES], float)
    d = boxes.translation[:, :2] - ego_translation[boxes.sample, :2]
    keep = np.sqrt(np.sum(d ** 2, axis=1)) < rng[boxes.label]
    keep &= boxes.num_pts != 0
    bike = np.isin(boxes.label, [CLASS_INDEX[c] for c in BIKE_CLASSES]) & keep
    if bike.any():
        idx = np.nonzero(bike)[0]
        keep[idx[in_bike_rack(boxes.take(idx), racks)]] = False
    return keep


@dataclass
class Matches:
    """Greedy matching result for one class and threshold, predictions in the devkit's order.

    Shapes (P predictions of the class, in descending score order):
        pred (P,) index into the prediction boxes   tp (P,) bool   gt (P,) matched GT index or -1
    """

    pred: np.ndarray
    tp: np.ndarray
    gt: np.ndarray


def match(gt: DetBoxes, pred: DetBoxes, dist_ths) -> dict:
    """Greedy centre-distance matching, as ``algo.py accumulate`` does it, for every class and threshold.

    The devkit visits a class's predictions by descending score (ties: later box first), and gives each
    the nearest still-unmatched GT of its class and sample (ties: the earlier GT), a match if nearer
    than the threshold. Samples and classes are independent, so the visits run as rounds: round r
    handles the r-th candidate prediction of every (sample, class) group at once. Only predictions
    with a GT within the threshold take part; the others are false positives that take nothing.

    Returns {(class index, threshold): Matches}.
    """
    n_gt = len(gt)
    out = {}
    # Devkit order within a class: sorted((score, i))[::-1] -> score descending, index descending.
    order = np.lexsort((np.arange(len(pred)), pred.score))[::-1]
    order = order[np.argsort(pred.label[order], kind="stable")]     # grouped by class, order kept
    rank = np.empty(len(pred), np.int64)
    rank[order] = np.arange(len(pred))
    gkey = gt.sample * len(CLASSES) + gt.label
    pkey = pred.sample * len(CLASSES) + pred.label
    ip, jg = _group_pairs(pkey, gkey)                                # candidate pairs, same sample and class
    diff = pred.translation[ip, :2] - gt.translation[jg, :2]
    dist = np.sqrt(np.einsum("ki,ki->k", diff, diff))              # center_distance
    close = dist < max(dist_ths)
    ip, jg, dist = ip[close], jg[close], dist[close]
    for th in dist_ths:
        sel = dist < th
        e_p, e_g, e_d = ip[sel], jg[sel], dist[sel]
        # Edges by (prediction rank, distance, GT index): the first untaken edge of a prediction is its match.
        eo = np.lexsort((e_g, e_d, rank[e_p]))
        e_p, e_g = e_p[eo], e_g[eo]
        cand, seg_start, seg_len = np.unique(e_p, return_index=True, return_counts=True)  # sorted by pred index
        by_rank = np.argsort(rank[cand])
        cand, seg_start, seg_len = cand[by_rank], seg_start[by_rank], seg_len[by_rank]
        # Round of each candidate: its position among the candidates of its (sample, class) group.
        ck = pkey[cand]
        go = np.argsort(ck, kind="stable")
        first = np.r_[True, ck[go][1:] != ck[go][:-1]]
        pos = np.arange(len(go)) - np.maximum.accumulate(np.where(first, np.arange(len(go)), 0))
        rnd = np.empty(len(cand), np.int64)
        rnd[go] = pos
        taken = np.zeros(n_gt, bool)
        matched_gt = np.full(len(pred), -1, np.int64)
        by_round = np.argsort(rnd, kind="stable")
        bounds = np.searchsorted(rnd[by_round], np.arange(rnd.max(initial=-1) + 2))
        for r in range(len(bounds) - 1):
            act = by_round[bounds[r]:bounds[r + 1]]                   # one candidate per group
            starts, lens = seg_start[act], seg_len[act]
            offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
            eidx = np.arange(lens.sum()) + offs                     # all edges of the active candidates
            free = ~taken[e_g[eidx]]
            seg_of = np.repeat(np.arange(len(act)), lens)
            local = np.where(free, np.arange(len(eidx)), len(eidx))
            firstfree = np.full(len(act), len(eidx))
            np.minimum.at(firstfree, seg_of, local)
            ok = firstfree < len(eidx)
            g = e_g[eidx[firstfree[ok]]]
            taken[g] = True
            matched_gt[cand[act[ok]]] = g
        for c in range(len(CLASSES)):
            p = order[pred.label[order] == c]
            out[(c, th)] = Matches(pred=p, tp=matched_gt[p] >= 0, gt=matched_gt[p])
    return out


def _cummean(x: np.ndarray) -> np.ndarray:
    """common/utils.py cummean, row by row: NaN-aware running mean; a row of only NaN gives ones.

    Shapes: x (R, K)   returns (R, K)
    """
    nan = np.isnan(x)
    sum_vals = np.cumsum(np.where(nan, 0.0, x), axis=1)          # np.nancumsum
    count_vals = np.cumsum(~nan, axis=1)
    out = np.divide(sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0)
    out[nan.all(axis=1)] = 1.0
    return out


def _no_predictions() -> dict:
    """DetectionMetricData.no_predictions."""
    return {"recall": np.linspace(0, 1, NELEM), "precision": np.zeros(NELEM), "confidence": np.zeros(NELEM),
            **{k: np.ones(NELEM) for k in ("trans_err", "vel_err", "scale_err", "orient_err", "attr_err")}}


def match_errors(gt: DetBoxes, pred: DetBoxes, gi: np.ndarray, pi: np.ndarray, class_name: str) -> dict:
    """TP errors of matched pairs (common/utils.py center_distance, velocity_l2, scale_iou, yaw_diff, attr_acc).

    Shapes: gi, pi (K,) indices of matched GT and predictions   returns: {name: (K,)}
    """
    d = pred.translation[pi, :2] - gt.translation[gi, :2]
    v = pred.velocity[pi] - gt.velocity[gi]
    sa, sr = gt.size[gi], pred.size[pi]
    inter = np.prod(np.minimum(sa, sr), axis=1)
    iou = inter / (np.prod(sa, axis=1) + np.prod(sr, axis=1) - inter)
    period = ORIENT_PERIOD.get(class_name, 2 * np.pi)
    diff = np.mod(gt.yaw[gi] - pred.yaw[pi] + period / 2, period) - period / 2
    diff = np.where(diff > np.pi, diff - 2 * np.pi, diff)
    ga = gt.attr[gi]
    acc = np.where(ga < 0, np.nan, (ga == pred.attr[pi]).astype(float))
    return {"trans_err": np.sqrt(np.einsum("ki,ki->k", d, d)), "vel_err": np.sqrt(np.einsum("ki,ki->k", v, v)),
            "scale_err": 1 - iou, "orient_err": np.abs(diff), "attr_err": 1 - acc}


ERRORS = ("trans_err", "vel_err", "scale_err", "orient_err", "attr_err")


def metric_data(gt: DetBoxes, pred: DetBoxes, m: Matches, npos: int, class_name: str, errors: bool = True) -> dict:
    """The 101-point curves of ``algo.py accumulate`` for one class and threshold (the TP-error curves only
    if ``errors``: the metrics use them at the TP threshold alone)."""
    if npos == 0 or not m.tp.any():
        return _no_predictions()
    conf_all = pred.score[m.pred]
    tp = np.cumsum(m.tp).astype(float)
    fp = np.cumsum(~m.tp).astype(float)
    prec = tp / (fp + tp)
    rec = tp / float(npos)
    rec_interp = np.linspace(0, 1, NELEM)
    out = {"recall": rec_interp, "precision": np.interp(rec_interp, rec, prec, right=0),
           "confidence": np.interp(rec_interp, rec, conf_all, right=0)}
    if not errors:
        return out
    match_conf = conf_all[m.tp]
    errs = match_errors(gt, pred, m.gt[m.tp], m.pred[m.tp], class_name)
    tmp = _cummean(np.stack([errs[k] for k in ERRORS]))          # (5, matches)
    for key, row in zip(ERRORS, tmp):
        out[key] = np.interp(out["confidence"][::-1], match_conf[::-1], row[::-1])[::-1]
    return out


def calc_ap(md: dict, min_recall: float, min_precision: float) -> float:
    """algo.py calc_ap: mean precision above the minimum recall, less the minimum precision, rescaled."""
    prec = np.copy(md["precision"])[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def max_recall_ind(md: dict) -> int:
    """DetectionMetricData.max_recall_ind: the last index with non-zero confidence."""
    nz = np.nonzero(md["confidence"])[0]
    return int(nz[-1]) if len(nz) else 0


def calc_tp(md: dict, min_recall: float, metric_name: str) -> float:
    """algo.py calc_tp: mean error from just above the minimum recall to the maximum recall reached."""
    first = round(100 * min_recall) + 1
    last = max_recall_ind(md)
    if last < first:
        return 1.0
    return float(np.mean(md[metric_name][first:last + 1]))


@dataclass
class DetectionResult:
    """Metrics in the devkit's ``DetectionMetrics.serialize()`` layout, plus the curves."""

    summary: dict
    curves: dict = field(repr=False)  # {(class, threshold): metric data dict}


def summarize(label_aps: dict, label_tp: dict, cfg=DETECTION_CVPR_2019) -> dict:
    """DetectionMetrics: mean_dist_aps, mean_ap, tp_errors (NaN-mean over classes), tp_scores, nd_score."""
    mean_dist_aps = {c: float(np.mean(list(d.values()))) for c, d in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    tp_errors = {m: float(np.nanmean([label_tp[c][m] for c in cfg["class_range"]])) for m in TP_METRICS}
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in TP_METRICS}
    nds = float(cfg["mean_ap_weight"] * mean_ap + np.sum(list(tp_scores.values())))
    nds = nds / float(cfg["mean_ap_weight"] + len(tp_scores))
    return {"label_aps": label_aps, "mean_dist_aps": mean_dist_aps, "mean_ap": mean_ap, "label_tp_errors": label_tp,
            "tp_errors": tp_errors, "tp_scores": tp_scores, "nd_score": nds}


def evaluate_boxes(gt: DetBoxes, pred: DetBoxes, ego_translation: np.ndarray, racks: Racks,
                   cfg=DETECTION_CVPR_2019, details: bool = False) -> DetectionResult:
    """The whole benchmark on unfiltered boxes: filter, match, curves, AP, TP errors, NDS.

    ``ego_translation`` (S, 3) is the LIDAR_TOP keyframe's ego position of each sample. ``details``: also
    compute the TP-error curves at every threshold (for metrics_details.json; no figure depends on them).
    """
    start = time.time()
    if list(cfg["class_range"]) != list(CLASSES):
        raise ValueError("cfg['class_range'] must list the ten detection classes in the devkit's order")
    gt = gt.take(filter_mask(gt, ego_translation, racks, cfg))
    pred = pred.take(filter_mask(pred, ego_translation, racks, cfg))
    matches = match(gt, pred, cfg["dist_ths"])
    npos = np.bincount(gt.label, minlength=len(CLASSES))
    curves, label_aps, label_tp = {}, {}, {}
    for c, name in enumerate(CLASSES):
        label_aps[name] = {}
        for th in cfg["dist_ths"]:
            md = metric_data(gt, pred, matches[(c, th)], int(npos[c]), name, details or th == cfg["dist_th_tp"])
            curves[(name, th)] = md
            label_aps[name][th] = calc_ap(md, cfg["min_recall"], cfg["min_precision"])
        label_tp[name] = {}
        for metric in TP_METRICS:
            if metric in TP_EXCLUDED.get(name, ()):
                label_tp[name][metric] = float("nan")
            else:
                label_tp[name][metric] = calc_tp(curves[(name, cfg["dist_th_tp"])], cfg["min_recall"], metric)
    summary = summarize(label_aps, label_tp, cfg)
    summary["eval_time"] = time.time() - start
    summary["cfg"] = copy.deepcopy(cfg)
    return DetectionResult(summary=summary, curves=curves)
