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
import zipfile
from collections.abc import Sequence
from importlib import resources
from itertools import chain, repeat
from operator import attrgetter
from pathlib import Path

import msgspec
import numpy as np
import orjson

from bevkit.geometry import inverse, make_transform, quat_to_matrix


def _loads(data: bytes):
    """Parse JSON bytes (orjson: several times faster than the standard parser on large tables)."""
    return orjson.loads(data)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while tables are decoded and indexed.

    Decoding creates hundreds of thousands of objects, none of them garbage and none in a cycle,
    yet each allocation burst triggers collections that traverse the tracked ones (lists, dicts)
    again and again: with orjson dicts this took the cold build from about 0.30 to 0.22 s. The
    previous state is restored, and nothing is collected that would not be later.
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

        Returns ``boxes`` (M, 9) as (x, y, z, l, w, h, yaw, vx, vy) and the category names (M,). The
        velocity is NaN where it is unknown (an annotation without neighbours), as in the index.
        """
        ego_from_global = inverse(self.global_from_ego(self.keyframe(sample, channel)))
        rows, names = [], []
        for ann in self.annotations(sample):
            w, l, h = ann["size"]
            r = ego_from_global[:3, :3] @ quat_to_matrix(ann["rotation"])
            c = ego_from_global[:3, :3] @ np.array(ann["translation"]) + ego_from_global[:3, 3]
            v = ego_from_global[:3, :3] @ self.velocity(ann)  # NaN stays NaN
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
INDEX_SCHEMA = 3
MAX_SWEEPS = 10
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")


def dataset_identity(root, version: str) -> str:
    """A fingerprint of a version's tables: the SHA-256 of each table's whole content (with its name
    and size). Any edit of a table, wherever it falls and whatever the file's times say, gives
    another identity, so an index (or a feature cache) made from other tables is never used; a
    copy of the dataset keeps its identity. Costs one read of the tables (about 8 ms for the 12 MB
    of the synthetic mini, a few seconds for v1.0-trainval), far less than parsing them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{version}:sha256".encode())
    for name in TABLES:
        path = Path(root) / version / f"{name}.json"
        h.update(name.encode())
        if not path.is_file():
            h.update(b"<missing>")
            continue
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
        h.update(f"{size}:{digest.hexdigest()}".encode())
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


# The records the index reads, as typed structs: decoding straight into them skips the dict of
# every record and the fields the index does not use, validates types and lengths on the way (a
# bad record is reported with its position and field), and the structs are not tracked by the
# cyclic garbage collector.
class _Sample(msgspec.Struct, gc=False):
    token: str
    scene_token: str
    timestamp: int
    prev: str | None = ""
    next: str | None = ""


class _SampleData(msgspec.Struct, gc=False):
    token: str
    sample_token: str
    ego_pose_token: str
    calibrated_sensor_token: str
    timestamp: int
    filename: str
    is_key_frame: bool
    prev: str | None = ""
    width: int | None = 0
    height: int | None = 0


class _Pose(msgspec.Struct, gc=False):
    token: str
    rotation: tuple[float, float, float, float]
    translation: tuple[float, float, float]


class _Calibration(msgspec.Struct, gc=False):
    token: str
    sensor_token: str
    rotation: tuple[float, float, float, float]
    translation: tuple[float, float, float]
    camera_intrinsic: list[list[float]] | None = None


class _Annotation(msgspec.Struct, gc=False):
    token: str
    sample_token: str
    instance_token: str
    attribute_tokens: list[str]
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    num_lidar_pts: int
    num_radar_pts: int = 0  # absent in some nuScenes-format datasets
    visibility_token: str | None = ""
    prev: str | None = ""
    next: str | None = ""


class _Named(msgspec.Struct, gc=False):  # sensor, category, attribute
    token: str
    name: str = ""
    channel: str = ""


class _Instance(msgspec.Struct, gc=False):
    token: str
    category_token: str


class _Scene(msgspec.Struct, gc=False):
    token: str
    name: str
    log_token: str


class _Log(msgspec.Struct, gc=False):
    token: str
    location: str


_RECORDS = {"sample": _Sample, "sample_data": _SampleData, "ego_pose": _Pose, "calibrated_sensor": _Calibration,
            "sample_annotation": _Annotation, "sensor": _Named, "category": _Named, "attribute": _Named,
            "instance": _Instance, "scene": _Scene, "log": _Log}
_DECODERS = {name: msgspec.json.Decoder(list[kind]) for name, kind in _RECORDS.items()}


def _read_records(root: Path, version: str, name: str) -> list:
    """The records of one table as typed structs; a missing, malformed or mistyped table is a DataError."""
    path = root / version / f"{name}.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: table {name!r} is missing") from None
    try:
        return _DECODERS[name].decode(data)
    except msgspec.ValidationError as e:
        raise DataError(f"{path}: {e} (table {name!r})") from None
    except msgspec.DecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


class _Rows:
    """Token -> row of one table, with lookups that name the table when a token dangles."""

    def __init__(self, path: Path, records: list):
        self.path = path
        self.row = {r.token: i for i, r in enumerate(records)}

    def __call__(self, tokens, referrer: str) -> list[int]:
        row = self.row
        try:
            return [row[t] for t in tokens]
        except KeyError as e:
            raise DataError(f"{self.path}: no record with token {e.args[0]!r} (referenced by {referrer})") from None


def _attr(records: list, name: str):
    """The field ``name`` of every record, lazily."""
    return map(attrgetter(name), records)


def _column(values, count: int, dtype=np.float64) -> np.ndarray:
    """A 1-D array of ``count`` values from an iterable, without an intermediate list."""
    return np.fromiter(values, dtype=dtype, count=count)


def _pose_matrices(rows: list) -> np.ndarray:
    """4x4 transforms of many records with ``rotation`` and ``translation`` at once.

    Shapes:
        returns: (R, 4, 4)
    """
    n = len(rows)
    out = np.zeros((n, 4, 4))
    if n:
        out[:, :3, :3] = quat_to_matrix(_column(chain.from_iterable(_attr(rows, "rotation")), 4 * n).reshape(n, 4))
        out[:, :3, 3] = _column(chain.from_iterable(_attr(rows, "translation")), 3 * n).reshape(n, 3)
        out[:, 3, 3] = 1.0
    return out


def _velocities(prev: np.ndarray, nxt: np.ndarray, time_us: np.ndarray, trans: np.ndarray,
                max_dt: float = 1.5) -> np.ndarray:
    """Global velocities of all annotations at once, as the devkit's ``box_velocity`` defines them.

    ``prev`` / ``nxt`` are the rows of the neighbouring annotations (-1: none), ``time_us`` each
    annotation's sample timestamp (int64 microseconds; differenced before scaling, as the devkit
    does). Shapes: (M,), (M,), (M,), (M, 3) -> (M, 3), NaN if unknown.
    """
    me = np.arange(len(prev))
    first = np.where(prev >= 0, prev, me)
    last = np.where(nxt >= 0, nxt, me)
    dt = (time_us[last] - time_us[first]) * 1e-6
    limit = np.where((prev >= 0) & (nxt >= 0), 2 * max_dt, max_dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        vel = (trans[last] - trans[first]) / dt[:, None]
    vel[((prev < 0) & (nxt < 0)) | (dt > limit)] = np.nan
    return vel


SENSOR_LIDAR, SENSOR_SWEEP = 0, len(CAMERAS) + 1  # sensor kinds; camera c of CAMERAS is kind c + 1


def build_index(root, version: str, max_sweeps: int = MAX_SWEEPS) -> tuple[dict, dict]:
    """Read the tables of ``root/version`` and index every sample: files, calibration, poses,
    sweeps and ego-frame boxes, as (strings, arrays).

    Camera poses are expressed relative to the ego pose of the LiDAR keyframe (the camera's own
    ego pose at its timestamp is composed in), so ``ego_from_cam`` is exact on real data where the
    cameras fire up to tens of milliseconds apart. Annotation boxes are in the ego frame of their
    sample's LiDAR keyframe. Everything numeric is computed in batches and kept as arrays:

    strings: ``scenes`` {token: {name, location, samples}}, ``sample_token`` / ``sample_scene`` /
        ``sample_prev`` / ``sample_next`` (S,), ``sensor_filename`` (K,), ``ann_token`` /
        ``ann_instance`` / ``ann_visibility`` (M,), ``categories`` / ``attributes`` (vocabularies).
    arrays: ``sample_timestamp`` (S,), ``global_from_ego`` (S, 4, 4) of the LiDAR keyframe,
        ``sensor_start`` (S + 1,) row offsets of each sample's sensor records, ``sensor_kind`` (K,)
        (0 LiDAR keyframe, c + 1 camera ``CAMERAS[c]``, 7 sweep, newest first),
        ``sensor_timestamp`` (K,), ``sensor_size`` (K, 2) width and height, ``sensor_intrinsics``
        (K, 3, 3), ``ego_from_sensor`` (K, 4, 4), ``ann_order`` (M,) annotation rows sample by
        sample with ``ann_start`` (S + 1,) offsets into it, ``ann_boxes`` (M, 9) as (x, y, z, l, w, h, yaw,
        vx, vy) with NaN velocity when unknown, ``ann_category`` / ``ann_attribute`` (M,) codes
        into the vocabularies (-1: no attribute), ``ann_num_lidar_pts`` / ``ann_num_radar_pts`` (M,)
        (radar 0 where the table has no such field).
    """
    root = Path(root)
    for name in TABLES:
        if not (root / version / f"{name}.json").is_file():
            raise DataError(f"{root / version / (name + '.json')}: table {name!r} is missing")
    t = {name: _read_records(root, version, name) for name in _RECORDS}
    path = {name: root / version / f"{name}.json" for name in _RECORDS}
    rows = {name: _Rows(path[name], t[name]) for name in ("ego_pose", "calibrated_sensor", "sensor", "category",
                                                           "attribute", "instance", "log")}

    samples = sorted(t["sample"], key=lambda r: (r.scene_token, r.timestamp))
    sample_pos = {s.token: i for i, s in enumerate(samples)}
    cs = t["calibrated_sensor"]
    cs_channel = [t["sensor"][k].channel for k in rows["sensor"]([c.sensor_token for c in cs], "calibrated_sensor")]
    sd = t["sample_data"]
    sd_row = dict(zip(_attr(sd, "token"), range(len(sd))))
    # Only keyframes are looked up by (sample, channel): real tables hold ten times more sweeps (cameras
    # at 12 Hz, LiDAR at 20 Hz, radars), and the records the index uses are resolved further down.
    kf = [i for i, d in enumerate(sd) if d.is_key_frame]
    kf_cs = rows["calibrated_sensor"]((sd[i].calibrated_sensor_token for i in kf), "sample_data")
    keyframe = {(sd[i].sample_token, cs_channel[c]): i for i, c in zip(kf, kf_cs)}

    # Every sensor record a sample needs, sample by sample: LiDAR keyframe, cameras, sweeps.
    use, kind, start = [], [], [0]
    for s in samples:
        j = keyframe.get((s.token, "LIDAR_TOP"))
        if j is None:
            raise DataError(f"{path['sample_data']}: sample {s.token} has no LIDAR_TOP keyframe")
        use.append(j)
        kind.append(SENSOR_LIDAR)
        for c, ch in enumerate(CAMERAS, 1):
            k = keyframe.get((s.token, ch))
            if k is not None:
                use.append(k)
                kind.append(c)
        for _ in range(max_sweeps):
            j = sd_row.get(sd[j].prev) if sd[j].prev else None
            if j is None:
                break
            use.append(j)
            kind.append(SENSOR_SWEEP)
        start.append(len(use))
    start = np.array(start, dtype=np.int64)
    use_sample = np.repeat(np.arange(len(samples)), np.diff(start))
    used = [sd[j] for j in use]
    use_pose = rows["ego_pose"](_attr(used, "ego_pose_token"), "sample_data")
    use_cs = np.array(rows["calibrated_sensor"](_attr(used, "calibrated_sensor_token"), "sample_data"), dtype=np.int64)

    poses = t["ego_pose"]
    global_from_sensor_ego = _pose_matrices([poses[k] for k in use_pose])  # (K, 4, 4): each record's ego pose
    g_key = global_from_sensor_ego[start[:-1]]  # (S, 4, 4): each sample's LiDAR keyframe pose (its first record)
    key_from_global = inverse(g_key)
    # keyframe ego <- global <- sensor's ego at its own time <- sensor
    ego_from_sensor = key_from_global[use_sample] @ global_from_sensor_ego @ _pose_matrices(cs)[use_cs]
    intrinsics = np.zeros((len(cs), 3, 3))
    for i, c in enumerate(cs):
        if c.camera_intrinsic:
            k = np.asarray(c.camera_intrinsic, dtype=np.float64)
            if k.shape != (3, 3):
                raise DataError(f"{path['calibrated_sensor']}: record {c.token}: camera_intrinsic must be 3x3 "
                                f"or empty, got shape {k.shape}")
            intrinsics[i] = k
    n_used = len(used)
    sensor_timestamp = _column(_attr(used, "timestamp"), n_used, np.int64)
    sensor_size = np.stack([_column((d.width or 0 for d in used), n_used, np.int64),
                            _column((d.height or 0 for d in used), n_used, np.int64)], axis=1)

    # Annotations, all at once: global boxes -> ego of their sample's LiDAR keyframe. Columns stay
    # in table order; ``ann_order`` lists the rows sample by sample. Annotations of samples that
    # are not in the sample table are left out.
    anns = t["sample_annotation"]
    n = len(anns)
    ann_sample = _column(map(sample_pos.get, _attr(anns, "sample_token"), repeat(-1)), n, np.int64)
    if n and ann_sample.min() < 0:
        anns = [a for a, k in zip(anns, ann_sample.tolist()) if k >= 0]
        n = len(anns)
        ann_sample = ann_sample[ann_sample >= 0]
    ann_order = np.argsort(ann_sample, kind="stable")
    ann_start = np.searchsorted(ann_sample[ann_order], np.arange(len(samples) + 1)).astype(np.int64)
    trans = _column(chain.from_iterable(_attr(anns, "translation")), 3 * n).reshape(n, 3)
    size = _column(chain.from_iterable(_attr(anns, "size")), 3 * n).reshape(n, 3)
    w, x, y, z = _column(chain.from_iterable(_attr(anns, "rotation")), 4 * n).reshape(n, 4).T
    # The box's forward axis, the first column of its rotation matrix (scaled by |q|^2, which
    # the yaw does not see).
    forward = np.stack([w * w + x * x - y * y - z * z, 2 * (x * y + w * z), 2 * (x * z - w * y)], axis=1)
    ann_token = list(_attr(anns, "token"))
    ann_row = dict(zip(ann_token, range(n)))
    prev = _column(map(ann_row.get, _attr(anns, "prev"), repeat(-1)), n, np.int64)
    nxt = _column(map(ann_row.get, _attr(anns, "next"), repeat(-1)), n, np.int64)
    sample_time = np.array([s.timestamp for s in samples], dtype=np.int64)
    vel = _velocities(prev, nxt, sample_time[ann_sample], trans)
    e_from_g = key_from_global[ann_sample]
    centre = np.einsum("nij,nj->ni", e_from_g[:, :3, :3], trans) + e_from_g[:, :3, 3]
    f_ego = np.einsum("nij,nj->ni", e_from_g[:, :2, :3], forward)
    yaw = np.arctan2(f_ego[:, 1], f_ego[:, 0])
    v_ego = np.einsum("nij,nj->ni", e_from_g[:, :3, :3], np.nan_to_num(vel))
    v_ego[np.isnan(vel[:, 0])] = np.nan
    boxes = np.concatenate([centre, size[:, [1, 0, 2]], yaw[:, None], v_ego[:, :2]], axis=1).reshape(n, 9)
    ann_instance = list(_attr(anns, "instance_token"))
    inst_category = np.array(rows["category"]([i.category_token for i in t["instance"]], "instance"), dtype=np.int64)
    ann_category = inst_category[np.array(rows["instance"](ann_instance, "sample_annotation"), dtype=np.int64)]
    attr = rows["attribute"].row
    try:
        ann_attribute = _column((attr[a[0]] if a else -1 for a in _attr(anns, "attribute_tokens")), n, np.int64)
    except KeyError as e:
        raise DataError(f"{path['attribute']}: no record with token {e.args[0]!r} "
                        "(referenced by sample_annotation)") from None

    scenes = {}
    logs = t["log"]
    for sc, k in zip(t["scene"], rows["log"]([sc.log_token for sc in t["scene"]], "scene")):
        scenes[sc.token] = {"name": sc.name, "location": logs[k].location, "samples": []}
    for s in samples:
        if s.scene_token not in scenes:
            raise DataError(f"{path['scene']}: no record with token {s.scene_token!r} (referenced by sample)")
        scenes[s.scene_token]["samples"].append(s.token)
    strings = {
        "scenes": scenes,
        "sample_token": [s.token for s in samples], "sample_scene": [s.scene_token for s in samples],
        "sample_prev": [s.prev or "" for s in samples], "sample_next": [s.next or "" for s in samples],
        "sensor_filename": [d.filename for d in used],
        "ann_token": ann_token, "ann_instance": ann_instance,
        "ann_visibility": [v or "" for v in _attr(anns, "visibility_token")],
        "categories": [c.name for c in t["category"]], "attributes": [a.name for a in t["attribute"]],
    }
    arrays = {
        "sample_timestamp": sample_time, "global_from_ego": g_key, "sensor_start": start,
        "sensor_kind": np.array(kind, dtype=np.int64), "sensor_timestamp": sensor_timestamp,
        "sensor_size": sensor_size, "sensor_intrinsics": intrinsics[use_cs],
        "ego_from_sensor": ego_from_sensor, "ann_start": ann_start, "ann_boxes": boxes,
        "ann_order": ann_order, "ann_category": ann_category, "ann_attribute": ann_attribute,
        "ann_num_lidar_pts": _column(_attr(anns, "num_lidar_pts"), n, np.int64),
        "ann_num_radar_pts": _column(_attr(anns, "num_radar_pts"), n, np.int64),
    }
    return strings, arrays


_STRING_KEYS = ("scenes", "sample_token", "sample_scene", "sample_prev", "sample_next", "sensor_filename", "ann_token",
                "ann_instance", "ann_visibility", "categories", "attributes")
_ARRAY_KEYS = ("sample_timestamp", "global_from_ego", "sensor_start", "sensor_kind", "sensor_timestamp",
               "sensor_size", "sensor_intrinsics", "ego_from_sensor", "ann_start", "ann_order", "ann_boxes",
               "ann_category", "ann_attribute", "ann_num_lidar_pts", "ann_num_radar_pts")


def _make_sample(st: dict, ar: dict, i: int) -> dict:
    """Sample ``i`` of an index as the dict ``NuScenesIndex.samples`` gives, from its strings and arrays."""
    out = {"token": st["sample_token"][i], "scene_token": st["sample_scene"][i],
           "timestamp": int(ar["sample_timestamp"][i]), "prev": st["sample_prev"][i],
           "next": st["sample_next"][i], "global_from_ego": ar["global_from_ego"][i].tolist(),
           "lidar": None, "cams": {}, "sweeps": []}
    a, b = int(ar["sensor_start"][i]), int(ar["sensor_start"][i + 1])
    for k, kind, ts, m in zip(range(a, b), ar["sensor_kind"][a:b].tolist(), ar["sensor_timestamp"][a:b].tolist(),
                              ar["ego_from_sensor"][a:b].tolist()):
        fname = st["sensor_filename"][k]
        if kind == SENSOR_LIDAR:
            out["lidar"] = {"filename": fname, "timestamp": ts, "ego_from_lidar": m}
        elif kind == SENSOR_SWEEP:
            out["sweeps"].append({"filename": fname, "timestamp": ts, "ego_from_sweep": m})
        else:
            w, h = ar["sensor_size"][k].tolist()
            out["cams"][CAMERAS[kind - 1]] = {"filename": fname, "timestamp": ts, "width": w, "height": h,
                                              "intrinsics": ar["sensor_intrinsics"][k].tolist(),
                                              "ego_from_cam": m}
    rows = ar["ann_order"][ar["ann_start"][i]:ar["ann_start"][i + 1]]
    boxes = ar["ann_boxes"][rows].tolist()
    for box in boxes:
        if box[7] != box[7]:  # NaN: unknown velocity, given as None
            box[7] = box[8] = None
    cats, attrs = st["categories"], st["attributes"]
    rows = rows.tolist()
    out["anns"] = {"token": [st["ann_token"][k] for k in rows],
                   "category": [cats[c] for c in ar["ann_category"][rows].tolist()],
                   "attribute": [attrs[c] if c >= 0 else "" for c in ar["ann_attribute"][rows].tolist()],
                   "instance": [st["ann_instance"][k] for k in rows],
                   "num_lidar_pts": ar["ann_num_lidar_pts"][rows].tolist(),
                   "num_radar_pts": ar["ann_num_radar_pts"][rows].tolist(),
                   "visibility": [st["ann_visibility"][k] for k in rows], "boxes": boxes}
    return out


class _Samples(Sequence):
    """The samples of an index as dicts, each made from the index's arrays when first asked for.

    It holds the index's strings and arrays, not the index: no reference cycle, so a dropped
    index (about 7 MB on the synthetic mini) is freed at once, not when the cyclic collector
    next runs."""

    def __init__(self, strings: dict, arrays: dict):
        self._strings, self._arrays = strings, arrays
        self._made: list[dict | None] = [None] * len(strings["sample_token"])

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        d = self._made[i]
        if d is None:
            d = self._made[i] = _make_sample(self._strings, self._arrays, range(len(self))[i])
        return d

    def take(self, positions) -> list[dict]:
        """The samples at ``positions``, made with the garbage collector paused: each sample is
        about a hundred new dicts and lists, and the collections their allocation triggers
        would traverse every sample made before (3x the time at 3,200 samples)."""
        with _gc_paused():
            return [self[k] for k in positions]


class NuScenesIndex:
    """The index of one version of a dataset, built once and cached as an ``.npz`` of plain arrays
    (loaded with ``allow_pickle=False``; the strings travel as one JSON document inside it).

    A cached index is used only if its schema version and the dataset's identity (a hash of the
    tables) match; otherwise it is rebuilt. ``samples`` are dicts in (scene, time) order::

        token, scene_token, timestamp, prev, next, global_from_ego (4x4, the LiDAR keyframe's),
        lidar {filename, timestamp, ego_from_lidar}, cams {channel: {filename, timestamp, width,
        height, intrinsics, ego_from_cam}}, sweeps [{filename, timestamp, ego_from_sweep}] newest
        first, anns {token, category, attribute, instance, num_lidar_pts, num_radar_pts, visibility, boxes}

    with boxes (x, y, z, l, w, h, yaw, vx, vy) in the ego frame, velocity None when unknown.
    """

    def __init__(self, root, version: str, identity: str, strings: dict, arrays: dict):
        self.root = Path(root)
        self.version = version
        self.identity = identity
        self._strings = strings
        self._arrays = arrays
        self.scenes: dict = strings["scenes"]
        self.samples = _Samples(strings, arrays)
        self._pos = {tok: i for i, tok in enumerate(strings["sample_token"])}

    def sample(self, token: str) -> dict:
        try:
            return self.samples[self._pos[token]]
        except KeyError:
            raise DataError(f"{self.root / self.version}: no sample with token {token!r}") from None

    def split(self, split: str) -> list[dict]:
        """Samples of a split, in (scene, time) order."""
        names = set(split_scenes(self.root, self.version, split))
        scenes = self.scenes
        keep = [i for i, tok in enumerate(self._strings["sample_scene"]) if scenes[tok]["name"] in names]
        return self.samples.take(keep)

    def location(self, sample: dict) -> str:
        return self.scenes[sample["scene_token"]]["location"]

    @classmethod
    def load(cls, root, version: str | None = None, cache_dir=None, rebuild: bool = False) -> "NuScenesIndex":
        """Load the cached index of ``root/version`` or build (and cache) it.

        The cache lives in ``cache_dir``, else ``$BEVKIT_CACHE``, else ``~/.cache/bevkit``; the file
        is written to a temporary name and moved into place, so a reader never sees half of it.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such dataset folder")
        version = version or find_version(root)
        identity = dataset_identity(root, version)
        cache = Path(cache_dir or os.environ.get("BEVKIT_CACHE") or Path.home() / ".cache" / "bevkit") / "index"
        path = cache / f"{version}-{identity}.npz"
        if path.is_file() and not rebuild:
            loaded = _read_index(path, identity)
            if loaded is not None:
                return cls(root, version, identity, *loaded)
        with _gc_paused():
            strings, arrays = build_index(root, version)
            header = {"schema": INDEX_SCHEMA, "identity": identity, "version": version, **strings}
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    np.savez(f, header=np.frombuffer(orjson.dumps(header), dtype=np.uint8), **arrays)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)  # only left when writing failed
            return cls(root, version, identity, strings, arrays)


def _read_index(path: Path, identity: str) -> tuple[dict, dict] | None:
    """(strings, arrays) of a cached index, or None if it is unreadable, foreign or of another schema."""
    try:
        with _gc_paused(), np.load(path, allow_pickle=False) as z:
            header = _loads(z["header"].tobytes())
            if not isinstance(header, dict) or header.get("schema") != INDEX_SCHEMA \
                    or header.get("identity") != identity:
                return None
            if any(k not in header for k in _STRING_KEYS):
                return None
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return header, arrays
