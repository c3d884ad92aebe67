"""Streaming nuScenes detection evaluation of in-memory predictions, with an exact merge.

    ev = DetectionEvaluator(load_detection_gt(NuScenesTables(root), "val"))
    for batch in loader:                                  # any process, any order
        ev.add(token, boxes_ego, scores, labels)          # (M, 9) ego boxes of one sample
    ev = gather_detections(ev)                            # under torch.distributed (gloo or nccl)
    result = ev.compute()                                 # DetectionResult, the devkit's figures

Predictions are kept per sample and concatenated in the split's sample order at ``compute``, so the
result does not depend on how samples were spread over processes or in which order they came.
"""

from __future__ import annotations

import numpy as np

from bevkit.data.nuscenes import DETECTION_CLASSES
from bevkit.eval.detection import (ATTRIBUTE_INDEX, CLASS_INDEX, DETECTION_CVPR_2019, DetBoxes, DetectionResult,
                                   evaluate_boxes)
from bevkit.eval.groundtruth import DetectionGT
from bevkit.eval.results import ResultsError


def _numpy(x, dtype=np.float64):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def ego_to_global(boxes_ego, global_from_ego: np.ndarray):
    """Ego-frame boxes (x, y, z, l, w, h, yaw, vx, vy) to the global frame as the results format has them.

    Shapes:
        boxes_ego: (M, 9)   global_from_ego: (4, 4)
        returns: translation (M, 3), size (M, 3) as [w, l, h], rotation (M, 4) [w, x, y, z], velocity (M, 2)
    """
    from bevkit.geometry import matrix_to_quat, yaw_to_quat

    b = _numpy(boxes_ego).reshape(-1, 9)
    rot = global_from_ego[:3, :3]
    translation = b[:, :3] @ rot.T + global_from_ego[:3, 3]
    w0, x0, y0, z0 = matrix_to_quat(rot)
    w1, _, _, z1 = yaw_to_quat(b[:, 6]).T                                        # about +z
    rotation = np.stack([w0 * w1 - z0 * z1, x0 * w1 + y0 * z1, y0 * w1 - x0 * z1, z0 * w1 + w0 * z1], 1)  # q0 q1
    vel = np.concatenate([b[:, 7:9], np.zeros((len(b), 1))], 1) @ rot.T
    return translation, b[:, [4, 3, 5]], rotation.reshape(-1, 4), vel[:, :2]


def boxes_to_results(sample_token: str, boxes_ego, scores, labels, global_from_ego, attributes=None) -> list:
    """One sample's predictions as official results-format boxes (what ``bevkit predict`` writes).

    ``labels`` index ``bevkit.data.nuscenes.DETECTION_CLASSES``; ``attributes`` are names or '' (default '').
    """
    t, s, r, v = ego_to_global(boxes_ego, global_from_ego)
    scores, labels = _numpy(scores).reshape(-1), _numpy(labels, np.int64).reshape(-1)
    attributes = [""] * len(t) if attributes is None else list(attributes)
    return [dict(sample_token=sample_token, translation=t[i].tolist(), size=s[i].tolist(), rotation=r[i].tolist(),
                 velocity=v[i].tolist(), detection_name=DETECTION_CLASSES[labels[i]],
                 detection_score=float(scores[i]), attribute_name=attributes[i]) for i in range(len(t))]


class DetectionEvaluator:
    """Accumulates predictions sample by sample; ``merge`` and ``compute`` are exact (see module doc)."""

    def __init__(self, gt: DetectionGT, cfg=DETECTION_CVPR_2019):
        self.gt = gt
        self.cfg = cfg
        self._index = gt.sample_index
        self.state: dict[str, dict] = {}  # sample token -> arrays of its predictions (global frame)

    def add(self, sample_token: str, boxes_ego, scores, labels, attributes=None) -> None:
        """Add one sample's predictions.

        Shapes:
            boxes_ego: (M, 9) as (x, y, z, l, w, h, yaw, vx, vy) in the LIDAR_TOP keyframe's ego frame
            scores: (M,)   labels: (M,) indices into ``bevkit.data.nuscenes.DETECTION_CLASSES``
            attributes: M attribute names ('' for none), or None
        """
        where = f"predictions: sample {sample_token}"
        if sample_token not in self._index:
            raise ResultsError(f"{where}: not a sample of the split")
        if sample_token in self.state:
            raise ResultsError(f"{where}: added twice")
        b = _numpy(boxes_ego)
        if b.ndim != 2 or b.shape[1] != 9:
            raise ResultsError(f"{where}: field 'boxes' must have shape (M, 9), got {tuple(b.shape)}")
        m = len(b)
        scores, labels = _numpy(scores).reshape(-1), _numpy(labels, np.int64).reshape(-1)
        if len(scores) != m or len(labels) != m:
            raise ResultsError(f"{where}: {m} boxes but {len(scores)} scores and {len(labels)} labels")
        if m > self.cfg["max_boxes_per_sample"]:
            raise ResultsError(f"{where}: {m} boxes, at most {self.cfg['max_boxes_per_sample']} are allowed")
        for name, arr in (("boxes", b), ("scores", scores)):
            if not np.isfinite(arr).all():
                raise ResultsError(f"{where}: field {name!r} is not finite (NaN or infinity)")
        if (b[:, 3:6] <= 0).any():
            raise ResultsError(f"{where}: field 'boxes' has a size (l, w, h) that is not positive")
        if m and (labels.min() < 0 or labels.max() >= len(DETECTION_CLASSES)):
            raise ResultsError(f"{where}: field 'labels' has a class index outside 0..{len(DETECTION_CLASSES) - 1}")
        attrs = np.full(m, -1, np.int64)
        if attributes is not None:
            attributes = list(attributes)
            bad = [a for a in attributes if a != "" and a not in ATTRIBUTE_INDEX]
            if len(attributes) != m or bad:
                raise ResultsError(f"{where}: field 'attributes' must give {m} known attribute names or ''")
            attrs = np.array([ATTRIBUTE_INDEX.get(a, -1) for a in attributes], np.int64)
        t, s, r, v = ego_to_global(b, self.gt.global_from_ego[self._index[sample_token]])
        from bevkit.eval.detection import quat_yaw

        label = np.array([CLASS_INDEX[DETECTION_CLASSES[i]] for i in labels], np.int64)
        self.state[sample_token] = dict(translation=t, size=s, yaw=quat_yaw(r), velocity=v, label=label,
                                        score=scores, attr=attrs)

    def merge(self, other: "DetectionEvaluator") -> "DetectionEvaluator":
        """Take another evaluator's samples (same split); a sample seen by both is an error."""
        both = set(self.state) & set(other.state)
        if both:
            raise ResultsError(f"predictions: sample {sorted(both)[0]} was evaluated in two places")
        self.state.update(other.state)
        return self

    def boxes(self) -> DetBoxes:
        missing = [t for t in self.gt.sample_tokens if t not in self.state]
        if missing:
            raise ResultsError(f"predictions: sample {missing[0]} has no predictions ({len(missing)} of "
                               f"{len(self.gt.sample_tokens)} missing; add empty arrays for samples without any)")
        parts = []
        for i, t in enumerate(self.gt.sample_tokens):
            d = self.state[t]
            n = len(d["score"])
            parts.append(DetBoxes(sample=np.full(n, i, np.int64), num_pts=np.full(n, -1, np.int64), **d))
        return DetBoxes.concat(parts)

    def compute(self) -> DetectionResult:
        return evaluate_boxes(self.gt.boxes, self.boxes(), self.gt.ego_translation, self.gt.racks, self.cfg)


def gather_detections(ev: DetectionEvaluator, group=None) -> DetectionEvaluator:
    """Merge every process's predictions into ``ev`` on every process (torch.distributed, any backend)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ev
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, ev.state, group=group)
    merged = DetectionEvaluator(ev.gt, ev.cfg)
    for s in states:
        other = DetectionEvaluator(ev.gt, ev.cfg)
        other.state = s
        merged.merge(other)
    ev.state = merged.state
    return ev
