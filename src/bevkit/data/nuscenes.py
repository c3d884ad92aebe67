"""Reading nuScenes-format tables: samples, sensor poses and annotation boxes in the ego frame.

The one place that knows the nuScenes schema. Ecosystem conventions are translated here once:
``calibrated_sensor`` becomes ``ego_from_<sensor>``, ``ego_pose`` becomes ``global_from_ego``, and
annotation ``size = [w, l, h]`` with a global ``[w, x, y, z]`` quaternion becomes the ego-frame box
``(x, y, z, l, w, h, yaw, vx, vy)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bevkit.geometry import inverse, make_transform, quat_to_matrix

TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")

# nuScenes category -> detection class (the detection benchmark's mapping).
DETECTION_CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
                     "pedestrian", "traffic_cone")
CATEGORY_TO_CLASS = {
    "vehicle.car": "car", "vehicle.truck": "truck", "vehicle.construction": "construction_vehicle",
    "vehicle.bus.bendy": "bus", "vehicle.bus.rigid": "bus", "vehicle.trailer": "trailer",
    "movable_object.barrier": "barrier", "vehicle.motorcycle": "motorcycle", "vehicle.bicycle": "bicycle",
    "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
}


class DataError(Exception):
    """A dataset problem, with the file and, where known, the table, token and field."""


def find_version(root: Path) -> str:
    """The version folder under ``root`` (the only one holding a ``sample.json``)."""
    found = sorted(p.parent.name for p in Path(root).glob("*/sample.json"))
    if not found:
        raise DataError(f"{root}: no version folder with nuScenes tables (expected e.g. {root}/v1.0-mini/sample.json)")
    if len(found) > 1:
        raise DataError(f"{root}: several versions ({', '.join(found)}); name one with --version")
    return found[0]


class NuScenesTables:
    """The 13 tables of a nuScenes-format dataset, indexed by token.

    ``root`` holds ``<version>/*.json``, ``samples/``, ``sweeps/`` and ``maps/``.
    """

    def __init__(self, root, version: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such dataset folder")
        self.version = version or find_version(self.root)
        self.tables: dict[str, list] = {}
        for name in TABLES:
            path = self.root / self.version / f"{name}.json"
            if not path.is_file():
                raise DataError(f"{path}: table {name!r} is missing")
            try:
                rows = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a list of records")
            self.tables[name] = rows
        self.index = {name: {r["token"]: r for r in rows} for name, rows in self.tables.items()}
        self.samples = sorted(self.tables["sample"], key=lambda r: (r["scene_token"], r["timestamp"]))
        self._sample_data = {}
        for sd in self.tables["sample_data"]:
            if sd["is_key_frame"]:
                channel = self.channel(sd)
                self._sample_data[(sd["sample_token"], channel)] = sd
        self._anns: dict[str, list] = {}
        for ann in self.tables["sample_annotation"]:
            self._anns.setdefault(ann["sample_token"], []).append(ann)

    def get(self, table: str, token: str) -> dict:
        try:
            return self.index[table][token]
        except KeyError:
            raise DataError(f"{self.root / self.version / (table + '.json')}: no record with token {token!r}") from None

    def channel(self, sd: dict) -> str:
        cs = self.get("calibrated_sensor", sd["calibrated_sensor_token"])
        return self.get("sensor", cs["sensor_token"])["channel"]

    def sample(self, key) -> dict:
        """A sample by token, or by position in (scene, time) order."""
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            i = int(key)
            if not -len(self.samples) <= i < len(self.samples):
                raise DataError(f"sample index {i} out of range: the dataset has {len(self.samples)} samples")
            return self.samples[i]
        return self.get("sample", key)

    def keyframe(self, sample: dict, channel: str) -> dict:
        try:
            return self._sample_data[(sample["token"], channel)]
        except KeyError:
            raise DataError(f"sample {sample['token']}: no keyframe for channel {channel}") from None

    def ego_from_sensor(self, sd: dict) -> np.ndarray:
        cs = self.get("calibrated_sensor", sd["calibrated_sensor_token"])
        return make_transform(cs["rotation"], cs["translation"])

    def intrinsics(self, sd: dict) -> np.ndarray:
        return np.array(self.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"], float)

    def global_from_ego(self, sd: dict) -> np.ndarray:
        pose = self.get("ego_pose", sd["ego_pose_token"])
        return make_transform(pose["rotation"], pose["translation"])

    def annotations(self, sample: dict) -> list[dict]:
        return self._anns.get(sample["token"], [])

    def category(self, ann: dict) -> str:
        inst = self.get("instance", ann["instance_token"])
        return self.get("category", inst["category_token"])["name"]

    def velocity(self, ann: dict, max_dt: float = 1.5) -> np.ndarray:
        """Global-frame velocity (vx, vy, vz) from the neighbouring annotations (NaN if none)."""
        prev = self.index["sample_annotation"].get(ann["prev"]) if ann["prev"] else None
        nxt = self.index["sample_annotation"].get(ann["next"]) if ann["next"] else None
        first, last = prev or ann, nxt or ann
        if first is last:
            return np.full(3, np.nan)
        t0 = self.get("sample", first["sample_token"])["timestamp"] * 1e-6
        t1 = self.get("sample", last["sample_token"])["timestamp"] * 1e-6
        dt = t1 - t0
        if dt > max_dt * (2 if prev is not None and nxt is not None else 1):
            return np.full(3, np.nan)
        return (np.array(last["translation"]) - np.array(first["translation"])) / dt

    def boxes_ego(self, sample: dict, channel: str = "LIDAR_TOP"):
        """Annotation boxes in the ego frame of a keyframe.

        Returns ``boxes`` (M, 9) as (x, y, z, l, w, h, yaw, vx, vy) and the category names (M,).
        """
        ego_from_global = inverse(self.global_from_ego(self.keyframe(sample, channel)))
        rows, names = [], []
        for ann in self.annotations(sample):
            w, l, h = ann["size"]
            r = ego_from_global[:3, :3] @ quat_to_matrix(ann["rotation"])
            c = ego_from_global[:3, :3] @ np.array(ann["translation"]) + ego_from_global[:3, 3]
            v = ego_from_global[:3, :3] @ np.nan_to_num(self.velocity(ann))
            rows.append([*c, l, w, h, np.arctan2(r[1, 0], r[0, 0]), v[0], v[1]])
            names.append(self.category(ann))
        return np.array(rows, dtype=np.float64).reshape(-1, 9), names


def box_corners(box) -> np.ndarray:
    """The 8 corners of a box (x, y, z, l, w, h, yaw, ...): bottom 4 then top 4, counter-clockwise
    from front-left.

    Shapes:
        box: (>=7,)   returns: (8, 3)
    """
    x, y, z, l, w, h, yaw = box[:7]
    dx = np.array([1, -1, -1, 1]) * l / 2
    dy = np.array([1, 1, -1, -1]) * w / 2
    c, s = np.cos(yaw), np.sin(yaw)
    xs, ys = x + c * dx - s * dy, y + s * dx + c * dy
    bottom = np.stack([xs, ys, np.full(4, z - h / 2)], 1)
    top = np.stack([xs, ys, np.full(4, z + h / 2)], 1)
    return np.concatenate([bottom, top])
