"""Reading nuScenes-format tables: samples, sensor poses and annotation boxes in the ego frame.

The one place that knows the nuScenes schema. Ecosystem conventions are translated here once:
``calibrated_sensor`` becomes ``ego_from_<sensor>``, ``ego_pose`` becomes ``global_from_ego``, and
annotation ``size = [w, l, h]`` with a global ``[w, x, y, z]`` quaternion becomes the ego-frame box
``(x, y, z, l, w, h, yaw, vx, vy)``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bevkit.geometry import inverse, make_transform, quat_to_matrix

import orjson


def _loads(data: bytes):
    """Parse JSON bytes (orjson: several times faster than the standard parser on large tables)."""
    return orjson.loads(data)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while tables are parsed and indexed.

    Parsing creates hundreds of thousands of dicts and lists, none of them garbage and none in
    a cycle, yet each allocation burst triggers collections that traverse them all again: on
    the synthetic mini, pausing the collector takes the cold build from about 0.30 to 0.2 s.
    The previous state is restored, and nothing is collected that would not be later.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

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
                rows = _loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
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


# ------------------------------------------------------------------------------------- the index
INDEX_SCHEMA = 1
MAX_SWEEPS = 10
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")


def dataset_identity(root, version: str) -> str:
    """A fingerprint of a version's tables (size, modification time, first and last 64 KiB of
    each): an index built from other tables is never used."""
    h = hashlib.blake2b(digest_size=16)
    h.update(version.encode())
    for name in TABLES:
        path = Path(root) / version / f"{name}.json"
        h.update(name.encode())
        if not path.is_file():
            h.update(b"<missing>")
            continue
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
            if st.st_size > 1 << 16:
                f.seek(max(st.st_size - (1 << 16), 1 << 16))
                h.update(f.read())
    return h.hexdigest()


def official_splits() -> dict:
    """The official nuScenes scene splits shipped with bevkit: train, val, test, mini_train, mini_val."""
    data = json.loads(resources.files("bevkit.data").joinpath("nuscenes_splits.json").read_text())
    return {k: v for k, v in data.items() if k != "about"}


def split_scenes(root, version: str, split: str) -> list[str]:
    """Scene names of a split: from ``<version>/splits.json`` when it names the split, else official."""
    path = Path(root) / version / "splits.json"
    custom = {}
    if path.is_file():
        try:
            custom = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(custom, dict):
            raise DataError(f"{path}: expected {{split name: [scene names]}}")
        if split in custom:
            if not isinstance(custom[split], list):
                raise DataError(f"{path}: split {split!r} must be a list of scene names")
            return list(custom[split])
    official = official_splits()
    if split in official:
        return list(official[split])
    raise DataError(f"unknown split {split!r} for {Path(root) / version}; known: "
                    f"{', '.join(sorted(set(official) | set(custom)))}")


def _velocities(anns: list, index_of: dict, sample_time: np.ndarray, ann_sample: np.ndarray,
                trans: np.ndarray, max_dt: float = 1.5) -> np.ndarray:
    """Global velocities of all annotations at once, as the devkit's ``box_velocity`` defines them."""
    n = len(anns)
    prev = np.array([index_of.get(a["prev"], -1) if a["prev"] else -1 for a in anns], dtype=np.int64)
    nxt = np.array([index_of.get(a["next"], -1) if a["next"] else -1 for a in anns], dtype=np.int64)
    me = np.arange(n)
    first = np.where(prev >= 0, prev, me)
    last = np.where(nxt >= 0, nxt, me)
    dt = (sample_time[ann_sample[last]] - sample_time[ann_sample[first]]) * 1e-6
    limit = np.where((prev >= 0) & (nxt >= 0), 2 * max_dt, max_dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        vel = (trans[last] - trans[first]) / dt[:, None]
    bad = ((prev < 0) & (nxt < 0)) | (dt > limit)
    vel[bad] = np.nan
    return vel


def _pose_matrices(rows: list) -> np.ndarray:
    """4x4 transforms of many records with ``rotation`` and ``translation`` at once.

    Shapes:
        returns: (R, 4, 4)
    """
    n = len(rows)
    out = np.zeros((n, 4, 4))
    if n:
        out[:, :3, :3] = quat_to_matrix(np.array([r["rotation"] for r in rows], dtype=np.float64))
        out[:, :3, 3] = np.array([r["translation"] for r in rows], dtype=np.float64)
        out[:, 3, 3] = 1.0
    return out


def build_index(tables: NuScenesTables, max_sweeps: int = MAX_SWEEPS) -> dict:
    """A JSON-ready index of every sample: files, calibration, poses, sweeps and ego-frame boxes.

    Camera poses are expressed relative to the ego pose of the LiDAR keyframe (the camera's own
    ego pose at its timestamp is composed in), so ``ego_from_cam`` is exact on real data where the
    cameras fire up to tens of milliseconds apart. Everything is computed in batches.
    """
    t = tables
    sd_index = t.index["sample_data"]
    samples = t.samples
    pose_row = {r["token"]: i for i, r in enumerate(t.tables["ego_pose"])}
    global_from_ego = _pose_matrices(t.tables["ego_pose"])
    cs_row = {r["token"]: i for i, r in enumerate(t.tables["calibrated_sensor"])}
    ego_from_sensor = _pose_matrices(t.tables["calibrated_sensor"])

    # Every sensor record a sample needs: (sample, sample_data, kind) with kind "lidar", a camera
    # channel, or "sweep".
    uses = []
    for i, s in enumerate(samples):
        lidar = t.keyframe(s, "LIDAR_TOP")
        uses.append((i, lidar, "lidar"))
        for ch in CAMERAS:
            sd = t._sample_data.get((s["token"], ch))
            if sd is not None:
                uses.append((i, sd, ch))
        sd = lidar
        for _ in range(max_sweeps):
            sd = sd_index.get(sd["prev"]) if sd["prev"] else None
            if sd is None:
                break
            uses.append((i, sd, "sweep"))
    key_rows = np.array([pose_row[sd["ego_pose_token"]] for _, sd, kind in uses if kind == "lidar"])
    ego_from_global_key = inverse(global_from_ego[key_rows])  # (S, 4, 4)
    u_sample = np.array([i for i, _, _ in uses])
    u_pose = np.array([pose_row[sd["ego_pose_token"]] for _, sd, _ in uses])
    u_cs = np.array([cs_row[sd["calibrated_sensor_token"]] for _, sd, _ in uses])
    # keyframe ego <- global <- sensor's ego at its own time <- sensor
    key_from_sensor = ego_from_global_key[u_sample] @ global_from_ego[u_pose] @ ego_from_sensor[u_cs]
    key_from_sensor_list = key_from_sensor.tolist()
    intrinsics = {r["token"]: r["camera_intrinsic"] for r in t.tables["calibrated_sensor"]}

    scenes = {}
    for sc in t.tables["scene"]:
        log = t.get("log", sc["log_token"])
        scenes[sc["token"]] = {"name": sc["name"], "location": log["location"], "samples": []}
    g_key = global_from_ego[key_rows].tolist()
    entries = [{"token": s["token"], "scene_token": s["scene_token"], "timestamp": s["timestamp"], "prev": s["prev"],
                "next": s["next"], "global_from_ego": g_key[i], "lidar": None, "cams": {}, "sweeps": [],
                "anns": None} for i, s in enumerate(samples)]
    for s in samples:
        scenes[s["scene_token"]]["samples"].append(s["token"])
    for (i, sd, kind), m in zip(uses, key_from_sensor_list):
        e = entries[i]
        if kind == "lidar":
            e["lidar"] = {"filename": sd["filename"], "timestamp": sd["timestamp"], "ego_from_lidar": m}
        elif kind == "sweep":
            e["sweeps"].append({"filename": sd["filename"], "timestamp": sd["timestamp"], "ego_from_sweep": m})
        else:
            e["cams"][kind] = {"filename": sd["filename"], "timestamp": sd["timestamp"], "width": sd["width"],
                               "height": sd["height"], "intrinsics": intrinsics[sd["calibrated_sensor_token"]],
                               "ego_from_cam": m}

    # Annotations, all at once: global boxes -> ego of their sample's LiDAR keyframe.
    sample_pos = {s["token"]: i for i, s in enumerate(samples)}
    sample_time = np.array([s["timestamp"] for s in samples], dtype=np.int64)
    anns = [a for a in t.tables["sample_annotation"] if a["sample_token"] in sample_pos]
    n = len(anns)
    ann_sample = np.array([sample_pos[a["sample_token"]] for a in anns], dtype=np.int64)
    trans = np.array([a["translation"] for a in anns], dtype=np.float64).reshape(n, 3)
    size = np.array([a["size"] for a in anns], dtype=np.float64).reshape(n, 3)
    rot = quat_to_matrix(np.array([a["rotation"] for a in anns], dtype=np.float64).reshape(n, 4))
    vel = _velocities(anns, {a["token"]: i for i, a in enumerate(anns)}, sample_time, ann_sample, trans)
    e_from_g = ego_from_global_key[ann_sample]
    centre = np.einsum("nij,nj->ni", e_from_g[:, :3, :3], trans) + e_from_g[:, :3, 3]
    r_ego = e_from_g[:, :3, :3] @ rot
    yaw = np.arctan2(r_ego[:, 1, 0], r_ego[:, 0, 0])
    v_ego = np.einsum("nij,nj->ni", e_from_g[:, :3, :3], np.nan_to_num(vel))
    v_ego[np.isnan(vel[:, 0])] = np.nan
    # NaN velocities (no neighbouring annotation) are written as null.
    boxes = np.concatenate([centre, size[:, [1, 0, 2]], yaw[:, None], v_ego[:, :2]], axis=1).tolist()
    cat_of_inst = {i["token"]: t.get("category", i["category_token"])["name"] for i in t.tables["instance"]}
    attr_name = {a["token"]: a["name"] for a in t.tables["attribute"]}
    for e in entries:
        e["anns"] = {"token": [], "category": [], "attribute": [], "instance": [], "num_lidar_pts": [],
                     "visibility": [], "boxes": []}
    for k, a in enumerate(anns):
        d = entries[ann_sample[k]]["anns"]
        d["token"].append(a["token"])
        d["category"].append(cat_of_inst[a["instance_token"]])
        d["attribute"].append(attr_name[a["attribute_tokens"][0]] if a["attribute_tokens"] else "")
        d["instance"].append(a["instance_token"])
        d["num_lidar_pts"].append(int(a["num_lidar_pts"]))
        d["visibility"].append(a["visibility_token"])
        b = boxes[k]
        if b[7] != b[7]:  # NaN: unknown velocity, stored as null
            b[7] = b[8] = None
        d["boxes"].append(b)
    return {"scenes": scenes, "samples": entries}


@dataclass
class NuScenesIndex:
    """The index of one version of a dataset, built once and cached as JSON (never pickle).

    A cached index is used only if its schema version and the dataset's identity (a hash of the
    tables) match; otherwise it is rebuilt.
    """

    root: Path
    version: str
    identity: str
    scenes: dict
    samples: list

    def __post_init__(self):
        self._pos = {s["token"]: i for i, s in enumerate(self.samples)}

    def sample(self, token: str) -> dict:
        try:
            return self.samples[self._pos[token]]
        except KeyError:
            raise DataError(f"{self.root / self.version}: no sample with token {token!r}") from None

    def split(self, split: str) -> list[dict]:
        """Samples of a split, in (scene, time) order."""
        names = set(split_scenes(self.root, self.version, split))
        return [s for s in self.samples if self.scenes[s["scene_token"]]["name"] in names]

    def location(self, sample: dict) -> str:
        return self.scenes[sample["scene_token"]]["location"]

    @classmethod
    def load(cls, root, version: str | None = None, cache_dir=None, rebuild: bool = False) -> "NuScenesIndex":
        """Load the cached index of ``root/version`` or build (and cache) it.

        The cache lives in ``cache_dir``, else ``$BEVKIT_CACHE``, else ``~/.cache/bevkit``.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such dataset folder")
        version = version or find_version(root)
        identity = dataset_identity(root, version)
        cache = Path(cache_dir or os.environ.get("BEVKIT_CACHE") or Path.home() / ".cache" / "bevkit") / "index"
        path = cache / f"{version}-{identity}.json"
        if path.is_file() and not rebuild:
            try:
                with _gc_paused():
                    data = _loads(path.read_bytes())
                    if data.get("schema") == INDEX_SCHEMA and data.get("identity") == identity:
                        return cls(root, version, identity, data["scenes"], data["samples"])
            except ValueError:
                pass  # unreadable: rebuilt below
        with _gc_paused():
            built = build_index(NuScenesTables(root, version))
            payload = {"schema": INDEX_SCHEMA, "identity": identity, "version": version, **built}
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(payload))
            os.replace(tmp, path)
            return cls(root, version, identity, built["scenes"], built["samples"])
