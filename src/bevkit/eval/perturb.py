"""Results files derived from ground truth (exact, jittered, dropped, spurious, mislabelled, random).

For checking the metrics against the devkit and for benchmarks: any detector's output is some mix of
these. Boxes come from the dataset's annotations in the global frame, in the official results format.
"""

from __future__ import annotations

import numpy as np

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, NuScenesTables
from bevkit.eval.detection import ATTRIBUTES, CLASSES
from bevkit.eval.groundtruth import split_scenes

KINDS = ("gt", "jitter", "drop", "spurious", "wrong_class", "random", "mixed")
# The attributes a class may carry (the devkit's detection_name_to_rel_attributes).
CLASS_ATTRIBUTES = {"pedestrian": ATTRIBUTES[0:3], "bicycle": ATTRIBUTES[3:5], "motorcycle": ATTRIBUTES[3:5],
                    **{c: ATTRIBUTES[5:8] for c in ("car", "bus", "construction_vehicle", "trailer", "truck")},
                    "barrier": (), "traffic_cone": ()}


def _yaw_quat(yaw):
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def gt_boxes(tables: NuScenesTables, split: str) -> dict:
    """{sample token: [results-format boxes of its annotated detection objects]} in sample-table order."""
    scenes = set(split_scenes(tables, split)[0])
    scene_name = {s["token"]: s["name"] for s in tables.tables["scene"]}
    attr_name = {a["token"]: a["name"] for a in tables.tables["attribute"]}
    out = {}
    for s in tables.tables["sample"]:
        if scene_name.get(s["scene_token"]) not in scenes:
            continue
        boxes = []
        for ann in tables.annotations(s):
            cls = CATEGORY_TO_CLASS.get(tables.category(ann))
            if cls is None:
                continue
            v = tables.velocity(ann)[:2]
            boxes.append(dict(sample_token=s["token"], translation=list(ann["translation"]), size=list(ann["size"]),
                              rotation=list(ann["rotation"]),
                              velocity=[float(x) if np.isfinite(x) else 0.0 for x in v], detection_name=cls,
                              detection_score=1.0,
                              attribute_name=attr_name[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else "",
                              num_lidar_pts=ann["num_lidar_pts"]))
        out[s["token"]] = boxes
    return out


def _random_box(rng, token, centre, cls=None):
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    attrs = CLASS_ATTRIBUTES[cls]
    r, a = rng.uniform(0, 55), rng.uniform(-np.pi, np.pi)
    return dict(sample_token=token, translation=[centre[0] + r * np.cos(a), centre[1] + r * np.sin(a),
                                                 centre[2] + rng.uniform(0, 2)],
                size=[float(x) for x in rng.uniform(0.3, 3.0, 3)], rotation=_yaw_quat(rng.uniform(-np.pi, np.pi)),
                velocity=[float(x) for x in rng.normal(0, 3, 2)], detection_name=cls,
                detection_score=float(rng.uniform()), attribute_name=str(rng.choice(attrs)) if attrs else "")


def make_results(tables: NuScenesTables, split: str, kind: str, seed: int = 0, boxes_per_sample: int = 0) -> dict:
    """A results file (``{"meta", "results"}``) of the given ``kind``; ``boxes_per_sample`` pads every sample
    with random low-score boxes up to that many (0: no padding)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    gt = gt_boxes(tables, split)
    results = {}
    for token, boxes in gt.items():
        ego = tables.get("ego_pose", tables.keyframe(tables.get("sample", token), "LIDAR_TOP")["ego_pose_token"])
        centre = np.array(ego["translation"], float)
        out = []
        for b in boxes:
            b = {k: v for k, v in b.items() if k != "num_lidar_pts"}
            if kind == "gt":
                out.append(b)
                continue
            if kind in ("jitter", "mixed"):
                b["translation"] = [x + e for x, e in zip(b["translation"], rng.normal(0, 0.6, 3))]
                b["size"] = [x * f for x, f in zip(b["size"], rng.uniform(0.7, 1.3, 3))]
                yaw = 2 * np.arctan2(b["rotation"][3], b["rotation"][0]) + rng.normal(0, 0.4)
                b["rotation"] = _yaw_quat(yaw + (np.pi if rng.uniform() < 0.1 else 0.0))
                b["velocity"] = [x + e for x, e in zip(b["velocity"], rng.normal(0, 0.8, 2))]
                attrs = CLASS_ATTRIBUTES[b["detection_name"]]
                if attrs and rng.uniform() < 0.3:
                    b["attribute_name"] = str(rng.choice(attrs))
                b["detection_score"] = float(rng.uniform())
            if kind in ("drop", "mixed") and rng.uniform() < 0.3:
                continue
            if kind in ("wrong_class", "mixed") and rng.uniform() < 0.2:
                b["detection_name"] = CLASSES[rng.integers(len(CLASSES))]
                attrs = CLASS_ATTRIBUTES[b["detection_name"]]
                b["attribute_name"] = str(rng.choice(attrs)) if attrs else ""
            if kind in ("drop", "spurious", "wrong_class"):
                b["detection_score"] = float(np.round(rng.uniform(), 1))   # coarse scores: many ties
            if kind == "random":
                continue
            out.append(b)
        if kind in ("spurious", "mixed"):
            out += [_random_box(rng, token, centre) for _ in range(max(3, len(boxes) // 3))]
        if kind == "random":
            out = [_random_box(rng, token, centre) for _ in range(max(5, len(boxes)))]
        if boxes_per_sample:
            out = out[:boxes_per_sample]
            pad = [_random_box(rng, token, centre) for _ in range(boxes_per_sample - len(out))]
            for b in pad:                    # a detector's low-confidence tail
                b["detection_score"] *= 0.2
            out += pad
        results[token] = out
    meta = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False, use_external=False)
    return {"meta": meta, "results": results}
