"""Validate a nuScenes-format dataset (schema, links, files, chains); each problem names file, table, token, field."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, TABLES, DataError, _loads, find_version

# table -> {field: table it points to}; "" tokens are allowed where a link may be absent.
FOREIGN_KEYS = {
    "instance": {"category_token": "category", "first_annotation_token": "sample_annotation",
                 "last_annotation_token": "sample_annotation"},
    "calibrated_sensor": {"sensor_token": "sensor"},
    "scene": {"log_token": "log", "first_sample_token": "sample", "last_sample_token": "sample"},
    "sample": {"scene_token": "scene", "prev": "sample", "next": "sample"},
    "sample_data": {"sample_token": "sample", "ego_pose_token": "ego_pose",
                    "calibrated_sensor_token": "calibrated_sensor", "prev": "sample_data", "next": "sample_data"},
    "sample_annotation": {"sample_token": "sample", "instance_token": "instance", "visibility_token": "visibility",
                          "prev": "sample_annotation", "next": "sample_annotation"},
}
OPTIONAL_LINKS = {"prev", "next", "visibility_token"}  # "" when absent (no visibility annotated, in nuScenes)
# The fields of every table (nuScenes schema, https://www.nuscenes.org/nuscenes#data-format) and the kind of value
# each must hold; the fields of OPTIONAL_FIELDS are checked only when present.
SCHEMA = {
    "category": {"token": "str", "name": "str"},
    "attribute": {"token": "str", "name": "str"},
    "visibility": {"token": "str", "level": "str"},
    "instance": {"token": "str", "category_token": "str", "nbr_annotations": "count", "first_annotation_token": "str",
                 "last_annotation_token": "str"},
    "sensor": {"token": "str", "channel": "str", "modality": "str"},
    "calibrated_sensor": {"token": "str", "sensor_token": "str", "translation": "vec3", "rotation": "quat",
                          "camera_intrinsic": "intrinsic"},
    "ego_pose": {"token": "str", "translation": "vec3", "rotation": "quat", "timestamp": "int"},
    "log": {"token": "str", "logfile": "str", "vehicle": "str", "date_captured": "str", "location": "str"},
    "scene": {"token": "str", "log_token": "str", "nbr_samples": "count", "first_sample_token": "str",
              "last_sample_token": "str", "name": "str"},
    "sample": {"token": "str", "timestamp": "int", "prev": "str", "next": "str", "scene_token": "str"},
    "sample_data": {"token": "str", "sample_token": "str", "ego_pose_token": "str", "calibrated_sensor_token": "str",
                    "timestamp": "int", "fileformat": "str", "is_key_frame": "bool", "height": "count",
                    "width": "count", "filename": "str", "prev": "str", "next": "str"},
    "sample_annotation": {"token": "str", "sample_token": "str", "instance_token": "str", "visibility_token": "str",
                          "attribute_tokens": "tokens", "translation": "vec3", "size": "size", "rotation": "quat",
                          "prev": "str", "next": "str", "num_lidar_pts": "count", "num_radar_pts": "count"},
    "map": {"token": "str", "log_tokens": "tokens", "filename": "str"},
}
OPTIONAL_FIELDS = {"sample_annotation": ("num_radar_pts",)}
# A whole-point .pcd.bin with fewer points than SPARSE_FRACTION (a tenth) of the median of its sensor's files (when
# it has at least SPARSE_MIN_SWEEPS) may be a sweep cut at a point boundary, or only a sparse one: a warning.
SPARSE_FRACTION = 0.1
SPARSE_MIN_SWEEPS = 5


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))


def _numbers(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_number(x) for x in v)


def _matrix3(v) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_numbers(row, 3) for row in v)


# kind -> (test of a value, what is expected)
KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "tokens": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of token strings"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "vec3": (lambda v: _numbers(v, 3), "3 numbers [x, y, z]"),
    "quat": (lambda v: _numbers(v, 4), "4 numbers [w, x, y, z]"),
    "size": (lambda v: _numbers(v, 3) and all(x > 0 for x in v), "3 positive numbers [w, l, h]"),
    "intrinsic": (lambda v: v == [] or _matrix3(v), "a 3x3 matrix (cameras) or [] (other sensors)"),
}


def _show(value, limit: int = 60) -> str:
    """A value as JSON, cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Problem:
    """One finding: where it is and what is wrong."""

    file: str
    table: str
    token: str
    field: str
    message: str
    severity: str = "error"

    def __str__(self):
        where = f"{self.table}[{self.token}].{self.field}" if self.token else f"{self.table}.{self.field}"
        return f"{self.severity}: {self.file}: {where}: {self.message}"


@dataclass
class Report:
    """The outcome of ``check_dataset``: a summary and the problems found."""

    root: str
    version: str
    summary: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.severity == "error"]

    def add(self, file, table, token, fld, message, severity="error"):
        self.problems.append(Problem(str(file), table, token, fld, message, severity))


def check_dataset(root, version: str | None = None, check_files: bool = True, progress: bool = False) -> Report:
    """Check every table, link and referenced file of ``root/version``.

    Raises ``DataError`` when ``root`` is not a dataset at all (no such folder, no version folder or
    several, a named version folder without any table); every problem of a dataset that is found is in
    the report.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    if version is None:
        version = find_version(root)
    elif not (root / version).is_dir():
        raise DataError(f"{root / version}: no such version folder")
    elif not any((root / version / f"{name}.json").is_file() for name in TABLES):
        raise DataError(f"{root / version}: no nuScenes tables in this folder (expected e.g. sample.json)")
    rep = Report(str(root), version)
    vdir = root / version
    tables: dict = {}  # the records with every field present and of the right kind
    known: dict = {}  # the tokens of every record, well-formed or not: links to them are not dangling
    raw: dict = {}
    broken = set()  # tables that could not be read: links into them are not checked
    for name in TABLES:
        path = vdir / f"{name}.json"
        tables[name], known[name], raw[name] = [], set(), []
        if not path.is_file():
            rep.add(path, name, "", "-", "table is missing")
            broken.add(name)
            continue
        try:
            rows = _loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            rep.add(path, name, "", "-", f"not valid JSON: {e}")
            broken.add(name)
            continue
        except OSError as e:
            rep.add(path, name, "", "-", f"cannot read: {e.strerror}")
            broken.add(name)
            continue
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            rep.add(path, name, "", "-", "expected a list of records")
            broken.add(name)
            continue
        raw[name] = rows
        schema = SCHEMA[name]
        optional = OPTIONAL_FIELDS.get(name, ())
        for i, r in enumerate(rows):
            token = r.get("token")
            if isinstance(token, str):
                known[name].add(token)
            else:
                token = f"#{i}"
            missing = [f for f in schema if f not in r and f not in optional]
            if missing:
                rep.add(path, name, token, ",".join(missing), "field missing")
            wrong = [f for f, kind in schema.items() if f in r and not KINDS[kind][0](r[f])]
            for f in wrong:
                rep.add(path, name, token, f, f"expected {KINDS[schema[f]][1]}, got {_show(r[f])}")
            if not missing and not wrong:
                tables[name].append(r)
    index = {name: {r["token"]: r for r in rows} for name, rows in tables.items()}
    for name, rows in raw.items():
        tokens = Counter(r["token"] for r in rows if isinstance(r.get("token"), str))
        dup = [t for t, n in tokens.items() if n > 1]
        if dup:
            rep.add(vdir / f"{name}.json", name, dup[0], "token", f"{len(dup)} duplicated token(s)")

    # Foreign keys.
    for name, links in FOREIGN_KEYS.items():
        path = vdir / f"{name}.json"
        for r in tables[name]:
            for fld, target in links.items():
                if target in broken:
                    continue
                value = r.get(fld)
                if value == "" and fld in OPTIONAL_LINKS:
                    continue
                if value not in known[target]:
                    rep.add(path, name, r["token"], fld, f"points to {target} {value!r}, which does not exist")
    for r in tables["sample_annotation"]:
        for a in r["attribute_tokens"]:
            if "attribute" not in broken and a not in known["attribute"]:
                rep.add(vdir / "sample_annotation.json", "sample_annotation", r["token"], "attribute_tokens",
                        f"attribute {a!r} does not exist")
    for r in tables["map"]:
        for lt in r["log_tokens"]:
            if "log" not in broken and lt not in known["log"]:
                rep.add(vdir / "map.json", "map", r["token"], "log_tokens", f"log {lt!r} does not exist")

    # Quaternions of unit norm; camera intrinsics 3x3 for cameras, [] for the other sensors.
    for name in ("ego_pose", "calibrated_sensor", "sample_annotation"):
        for r in tables[name]:
            if abs(np.linalg.norm(np.asarray(r["rotation"], dtype=np.float64)) - 1) > 1e-4:
                rep.add(vdir / f"{name}.json", name, r["token"], "rotation",
                        f"not a unit quaternion [w, x, y, z]: {r['rotation']}")
    for r in tables["calibrated_sensor"]:
        sensor = index["sensor"].get(r["sensor_token"])
        if sensor is None:
            continue
        camera = sensor["modality"] == "camera"
        if camera != (r["camera_intrinsic"] != []):
            rep.add(vdir / "calibrated_sensor.json", "calibrated_sensor", r["token"], "camera_intrinsic",
                    f"expected {'a 3x3 matrix' if camera else '[]'} for {sensor['modality']} sensor "
                    f"{sensor['channel']}, got {_show(r['camera_intrinsic'])}")

    # Chains: both ways, and timestamps increasing. Links to malformed records (reported above) are not followed.
    def time_of(name, r):
        if name == "sample_annotation":
            s = index["sample"].get(r["sample_token"])
            return s["timestamp"] if s else None
        return r["timestamp"]

    for name in ("sample", "sample_data", "sample_annotation"):
        path = vdir / f"{name}.json"
        for r in tables[name]:
            nxt = index[name].get(r["next"]) if r["next"] else None
            if nxt is not None:
                if nxt["prev"] != r["token"]:
                    rep.add(path, name, r["token"], "next", f"next {nxt['token']} has prev {nxt['prev']!r}, not this")
                t0, t1 = time_of(name, r), time_of(name, nxt)
                if t0 is not None and t1 is not None and not t1 > t0:
                    rep.add(path, name, r["token"], "timestamp", f"does not increase to next ({t0} -> {t1})")
            prev = index[name].get(r["prev"]) if r["prev"] else None
            if prev is not None and prev["next"] != r["token"]:
                rep.add(path, name, r["token"], "prev", f"prev {prev['token']} has next {prev['next']!r}, not this")
    malformed = {name: known[name] - index[name].keys() for name in TABLES}
    for sc in tables["scene"]:
        token, n, seen = sc["first_sample_token"], 0, set()
        s = index["sample"].get(token)
        while s is not None and s["token"] not in seen:
            seen.add(s["token"])
            n += 1
            if s["scene_token"] != sc["token"]:
                rep.add(vdir / "sample.json", "sample", s["token"], "scene_token", f"chain of scene {sc['name']} "
                        f"reaches a sample of another scene")
                break
            token = s["next"]
            s = index["sample"].get(token) if token else None
        if n != sc["nbr_samples"] and token not in malformed["sample"]:
            rep.add(vdir / "scene.json", "scene", sc["token"], "nbr_samples",
                    f"says {sc['nbr_samples']} samples, the chain has {n}")
    ann_count = Counter(r.get("instance_token") for r in raw["sample_annotation"]
                        if isinstance(r.get("instance_token"), str))
    for inst in tables["instance"]:
        if ann_count[inst["token"]] != inst["nbr_annotations"]:
            rep.add(vdir / "instance.json", "instance", inst["token"], "nbr_annotations",
                    f"says {inst['nbr_annotations']}, the table has {ann_count[inst['token']]}")

    # Files referenced by sample_data and map.
    if check_files:
        rows = tables["sample_data"]
        iterator = rows
        if progress:
            from tqdm import tqdm

            iterator = tqdm(rows, desc="files", unit="file")
        sweeps: dict = {}  # channel -> [(path, token, points)] of the whole-point .pcd.bin files
        for r in iterator:
            path = root / r["filename"]
            if not path.is_file():
                rep.add(path, "sample_data", r["token"], "filename", "file is missing")
                continue
            size = path.stat().st_size
            if r["fileformat"] in ("jpg", "png", "jpeg"):
                try:
                    with Image.open(path) as im:
                        if im.size != (r["width"], r["height"]):
                            rep.add(path, "sample_data", r["token"], "width,height",
                                    f"image is {im.size[0]}x{im.size[1]}, the table says {r['width']}x{r['height']}")
                        if r.get("is_key_frame"):
                            im.verify()
                except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                    rep.add(path, "sample_data", r["token"], "filename", f"not a readable image ({e})")
            elif r["fileformat"] == "pcd" and path.name.endswith(".pcd.bin"):
                if size == 0:
                    rep.add(path, "sample_data", r["token"], "filename", "file is empty")
                elif size % 20:
                    rep.add(path, "sample_data", r["token"], "filename",
                            f"{size} bytes is not a whole number of float32 x 5 points (truncated?)")
                else:
                    cs = index["calibrated_sensor"].get(r["calibrated_sensor_token"])
                    sensor = index["sensor"].get(cs["sensor_token"]) if cs else None
                    channel = sensor["channel"] if sensor else r["calibrated_sensor_token"]
                    sweeps.setdefault(channel, []).append((path, r["token"], size // 20))
        for channel, found in sweeps.items():
            if len(found) < SPARSE_MIN_SWEEPS:
                continue
            typical = int(np.median([n for _, _, n in found]))
            for path, token, n in found:
                if n < SPARSE_FRACTION * typical:
                    rep.add(path, "sample_data", token, "filename", f"{n} points, under a tenth of the {typical} "
                            f"of a typical {channel} sweep (truncated?)", severity="warning")
        for r in tables["map"]:
            if not (root / r["filename"]).is_file():
                rep.add(root / r["filename"], "map", r["token"], "filename", "map mask is missing")
        for loc in sorted({r["location"] for r in tables["log"]}):
            path = root / "maps" / "expansion" / f"{loc}.json"
            if not path.is_file():
                rep.add(path, "log", "", "location", f"no map expansion for {loc} (map targets unavailable)",
                        severity="warning")
            else:
                try:
                    m = json.loads(path.read_text())
                except ValueError as e:
                    rep.add(path, "map_expansion", "", "-", f"not valid JSON: {e}")
                    continue
                if not isinstance(m, dict):
                    rep.add(path, "map_expansion", "", "-", "expected a JSON object")
                    continue
                for key in ("node", "line", "polygon", "version", "canvas_edge"):
                    if key not in m:
                        rep.add(path, "map_expansion", "", key, "key missing")

    cat_of = {i["token"]: index["category"].get(i["category_token"], {}).get("name", "?") for i in tables["instance"]}
    per_class = Counter(CATEGORY_TO_CLASS.get(cat_of.get(a["instance_token"]), "(other)")
                        for a in tables["sample_annotation"])
    rep.summary = {
        "version": version, "scenes": len(tables["scene"]), "samples": len(tables["sample"]),
        "sample_data": len(tables["sample_data"]), "annotations": len(tables["sample_annotation"]),
        "instances": len(tables["instance"]), "annotations_per_class": dict(sorted(per_class.items())),
        "locations": sorted({r["location"] for r in tables["log"]}),
    }
    return rep
