"""Detection ground truth of a split, read with bevkit's own table reader (``NuScenesTables``).

What the devkit's ``load_gt`` + ``add_center_dist`` produce, as flat arrays: boxes in the global frame
with the devkit's velocity (``box_velocity``, NaN without a neighbour), LiDAR + radar point counts,
the attribute name ('' when the annotation has none), the LIDAR_TOP keyframe ego pose of each sample,
and the bicycle racks for the bike-rack filter.

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, DataError, NuScenesTables, official_splits
from bevkit.data.nuscenes import split_scenes as data_split_scenes
from bevkit.eval.detection import ATTRIBUTE_INDEX, CLASS_INDEX, DetBoxes, Racks, quat_yaw

BIKE_RACK = "static_object.bicycle_rack"


def split_scenes(tables: NuScenesTables, split: str) -> tuple[list[str], bool]:
    """Scene names of ``split`` (see ``bevkit.data.nuscenes.split_scenes``) and whether the split is
    one of the official ones (the devkit then requires the results to cover exactly its samples)."""
    return data_split_scenes(tables.root, tables.version, split), split in official_splits()


@dataclass
class DetectionGT:
    """Ground truth of a split for the detection benchmark.

    Shapes (S samples): sample_tokens [S]   ego_translation (S, 3)   global_from_ego (S, 4, 4)
    """

    sample_tokens: list
    ego_translation: np.ndarray
    global_from_ego: np.ndarray
    boxes: DetBoxes
    racks: Racks

    @property
    def sample_index(self) -> dict:
        return {t: i for i, t in enumerate(self.sample_tokens)}


def load_detection_gt(tables: NuScenesTables, split: str) -> DetectionGT:
    """GT boxes of the split's samples, in sample-table order, annotations in table order (as the devkit)."""
    scenes, _ = split_scenes(tables, split)
    names = set(scenes)
    scene_name = {s["token"]: s["name"] for s in tables.tables["scene"]}
    samples = [s for s in tables.tables["sample"] if scene_name.get(s["scene_token"]) in names]
    if not samples:
        raise DataError(f"{tables.root / tables.version}: split {split!r} has no samples in this dataset")
    attr_name = {a["token"]: a["name"] for a in tables.tables["attribute"]}
    tokens, ego_t, g_from_e = [], [], []
    rows, rack_rows = [], []
    for si, s in enumerate(samples):
        sd = tables.keyframe(s, "LIDAR_TOP")
        pose = tables.get("ego_pose", sd["ego_pose_token"])
        tokens.append(s["token"])
        ego_t.append(pose["translation"])
        g_from_e.append(tables.global_from_ego(sd))
        for ann in tables.annotations(s):
            cat = tables.category(ann)
            if cat == BIKE_RACK:
                rack_rows.append((si, ann["translation"], ann["size"], ann["rotation"]))
            cls = CATEGORY_TO_CLASS.get(cat)
            if cls is None:
                continue
            attrs = ann["attribute_tokens"]
            if len(attrs) > 1:
                raise DataError(f"sample_annotation {ann['token']}: more than one attribute (the benchmark allows one)")
            attr = ATTRIBUTE_INDEX.get(attr_name[attrs[0]]) if attrs else -1
            if attr is None:  # the devkit refuses it too
                raise DataError(f"sample_annotation {ann['token']}: attribute {attr_name[attrs[0]]!r} is not one of "
                                f"the detection benchmark's ({', '.join(ATTRIBUTE_INDEX)})")
            rows.append((si, ann["translation"], ann["size"], ann["rotation"], tables.velocity(ann)[:2],
                         CLASS_INDEX[cls], attr, ann["num_lidar_pts"] + ann.get("num_radar_pts", 0)))
    if rows:
        si, tr, sz, rot, vel, lab, attr, npts = zip(*rows)
        boxes = DetBoxes(sample=np.array(si, np.int64), translation=np.array(tr, float), size=np.array(sz, float),
                         yaw=quat_yaw(np.array(rot, float)), velocity=np.array(vel, float),
                         label=np.array(lab, np.int64), score=np.full(len(rows), -1.0),
                         attr=np.array(attr, np.int64), num_pts=np.array(npts, np.int64))
    else:
        boxes = DetBoxes.empty()
    if rack_rows:
        si, tr, sz, rot = zip(*rack_rows)
        racks = Racks(np.array(si, np.int64), np.array(tr, float), np.array(sz, float), np.array(rot, float))
    else:
        racks = Racks(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 4)))
    return DetectionGT(sample_tokens=tokens, ego_translation=np.array(ego_t, float),
                       global_from_ego=np.array(g_from_e, float), boxes=boxes, racks=racks)
