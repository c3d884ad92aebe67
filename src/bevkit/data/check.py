"""Validate a nuScenes-format dataset: tables, links, files, quaternions, timestamps and chains.

Every problem is reported with the file, the table, the token and the field it concerns.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, TABLES, _loads

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
OPTIONAL_LINKS = {"prev", "next"}
REQUIRED_FIELDS = {
    "category": ("token", "name"),
    "attribute": ("token", "name"),
    "visibility": ("token", "level"),
    "instance": ("token", "category_token", "nbr_annotations", "first_annotation_token", "last_annotation_token"),
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation", "timestamp"),
    "log": ("token", "logfile", "vehicle", "date_captured", "location"),
    "scene": ("token", "log_token", "nbr_samples", "first_sample_token", "last_sample_token", "name"),
    "sample": ("token", "timestamp", "prev", "next", "scene_token"),
    "sample_data": ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp", "fileformat",
                    "is_key_frame", "height", "width", "filename", "prev", "next"),
    "sample_annotation": ("token", "sample_token", "instance_token", "visibility_token", "attribute_tokens",
                          "translation", "size", "rotation", "prev", "next", "num_lidar_pts"),
    "map": ("token", "log_tokens", "filename"),
}


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
        if self.table == "-":
            return f"{self.severity}: {self.file}: {self.message}"
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
    """Check every table, link and referenced file of ``root/version``."""
    root = Path(root)
    if not root.is_dir():
        rep = Report(str(root), version or "")
        rep.add(root, "-", "", "-", "no such dataset folder")
        return rep
    if version is None:
        found = sorted(p.parent.name for p in root.glob("*/sample.json"))
        version = found[0] if len(found) == 1 else ""
        if not version:
            rep = Report(str(root), "")
            rep.add(root, "-", "", "-", "no version folder with tables" if not found else
                    f"several versions ({', '.join(found)}); name one with --version")
            return rep
    rep = Report(str(root), version)
    vdir = root / version
    tables: dict = {}
    broken = set()  # tables that could not be read: links into them are not checked
    for name in TABLES:
        path = vdir / f"{name}.json"
        if not path.is_file():
            rep.add(path, name, "", "-", "table is missing")
            tables[name] = []
            broken.add(name)
            continue
        try:
            rows = _loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            rep.add(path, name, "", "-", f"not valid JSON: {e}")
            tables[name] = []
            broken.add(name)
            continue
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            rep.add(path, name, "", "-", "expected a list of records")
            tables[name] = []
            broken.add(name)
            continue
        good = []
        for i, r in enumerate(rows):
            missing = [f for f in REQUIRED_FIELDS.get(name, ("token",)) if f not in r]
            if missing:
                rep.add(path, name, str(r.get("token", f"#{i}")), ",".join(missing), "field missing")
                continue
            good.append(r)
        tables[name] = good
    index = {name: {r["token"]: r for r in rows} for name, rows in tables.items()}
    for name, rows in tables.items():
        if len(index[name]) != len(rows):
            dup = [t for t, n in Counter(r["token"] for r in rows).items() if n > 1]
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
                if value not in index[target]:
                    rep.add(path, name, r["token"], fld, f"points to {target} {value!r}, which does not exist")
    for r in tables["sample_annotation"]:
        for a in r.get("attribute_tokens", []):
            if "attribute" not in broken and a not in index["attribute"]:
                rep.add(vdir / "sample_annotation.json", "sample_annotation", r["token"], "attribute_tokens",
                        f"attribute {a!r} does not exist")
    for r in tables["map"]:
        for lt in r.get("log_tokens", []):
            if lt not in index["log"]:
                rep.add(vdir / "map.json", "map", r["token"], "log_tokens", f"log {lt!r} does not exist")

    # Quaternions of unit norm.
    for name in ("ego_pose", "calibrated_sensor", "sample_annotation"):
        for r in tables[name]:
            q = np.asarray(r["rotation"], dtype=np.float64)
            if q.shape != (4,) or not np.isfinite(q).all() or abs(np.linalg.norm(q) - 1) > 1e-4:
                rep.add(vdir / f"{name}.json", name, r["token"], "rotation",
                        f"not a unit quaternion [w, x, y, z]: {r['rotation']}")
    for r in tables["sample_annotation"]:
        size = np.asarray(r["size"], dtype=np.float64)
        if size.shape != (3,) or not (size > 0).all():
            rep.add(vdir / "sample_annotation.json", "sample_annotation", r["token"], "size",
                    f"expected three positive numbers [w, l, h], got {r['size']}")

    # Chains: both ways, and timestamps increasing.
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
    for sc in tables["scene"]:
        s, n, seen = index["sample"].get(sc["first_sample_token"]), 0, set()
        while s is not None and s["token"] not in seen:
            seen.add(s["token"])
            n += 1
            if s["scene_token"] != sc["token"]:
                rep.add(vdir / "sample.json", "sample", s["token"], "scene_token", f"chain of scene {sc['name']} "
                        f"reaches a sample of another scene")
                break
            s = index["sample"].get(s["next"]) if s["next"] else None
        if n != sc["nbr_samples"]:
            rep.add(vdir / "scene.json", "scene", sc["token"], "nbr_samples",
                    f"says {sc['nbr_samples']} samples, the chain has {n}")
    ann_count = Counter(r["instance_token"] for r in tables["sample_annotation"])
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
                except OSError as e:
                    rep.add(path, "sample_data", r["token"], "filename", f"not a readable image ({e})")
            elif r["fileformat"] == "pcd" and path.name.endswith(".pcd.bin"):
                if size == 0 or size % 20:
                    rep.add(path, "sample_data", r["token"], "filename",
                            f"{size} bytes is not a whole number of float32 x 5 points (truncated?)")
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
                    for key in ("node", "line", "polygon", "version", "canvas_edge"):
                        if key not in m:
                            rep.add(path, "map_expansion", "", key, "key missing")
                except ValueError as e:
                    rep.add(path, "map_expansion", "", "-", f"not valid JSON: {e}")

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
