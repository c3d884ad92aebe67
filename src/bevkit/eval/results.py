"""Reading and validating a detection results file in the official nuScenes format.

    {"meta": {...}, "results": {sample_token: [{"sample_token", "translation": [x, y, z],
     "size": [w, l, h], "rotation": [w, x, y, z], "velocity": [vx, vy], "detection_name",
     "detection_score", "attribute_name"}, ...]}}

Every problem is a ``ResultsError`` naming the file, the sample token, the box and the field. The checks
are those of the devkit's ``EvalBox``/``DetectionBox`` constructors and ``load_prediction`` (field
lengths, known class and attribute, at most 500 boxes, the split's samples exactly), plus what the
devkit lets through and later trips on or silently miscounts: any non-finite number (the devkit
accepts a NaN or infinite velocity, and infinities anywhere), sizes that are not positive
(``scale_iou`` asserts on them), an all-zero quaternion, and a box whose ``sample_token`` differs from
the key it is filed under.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bevkit.eval.detection import ATTRIBUTE_INDEX, CLASS_INDEX, CLASSES, DETECTION_CVPR_2019, DetBoxes, quat_yaw


class ResultsError(ValueError):
    """A bad results file or bad in-memory predictions: the message names the sample token and the field."""


_VECTORS = {"translation": 3, "size": 3, "rotation": 4, "velocity": 2}
_REQUIRED = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
             "attribute_name")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_box(where: str, token: str, box) -> None:
    """Find what is wrong with one box (the slow path, run only when the fast checks fail)."""
    if not isinstance(box, dict):
        raise ResultsError(f"{where}: expected a box object, got {type(box).__name__}")
    for key in _REQUIRED:
        if key not in box:
            raise ResultsError(f"{where}: field {key!r} is missing")
    if box.get("sample_token", token) != token:
        raise ResultsError(f"{where}: field 'sample_token' is {box['sample_token']!r}, but the box is filed under "
                           f"{token!r}")
    for key, n in _VECTORS.items():
        v = box[key]
        if not isinstance(v, (list, tuple)) or len(v) != n:
            got = f"{len(v)} values" if isinstance(v, (list, tuple)) else repr(v)
            raise ResultsError(f"{where}: field {key!r} must have {n} numbers, got {got}")
        if not all(_is_number(x) for x in v):
            raise ResultsError(f"{where}: field {key!r} must hold numbers, got {v!r}")
        if not all(math.isfinite(x) for x in v):
            raise ResultsError(f"{where}: field {key!r} is not finite (NaN or infinity): {v!r}")
    if not all(x > 0 for x in box["size"]):
        raise ResultsError(f"{where}: field 'size' must be positive, got {box['size']!r}")
    if not any(x != 0 for x in box["rotation"]):
        raise ResultsError(f"{where}: field 'rotation' is the zero quaternion")
    name = box["detection_name"]
    if not isinstance(name, str) or name not in CLASS_INDEX:
        raise ResultsError(f"{where}: field 'detection_name' has unknown class {name!r} (expected one of "
                           f"{', '.join(CLASSES)})")
    score = box["detection_score"]
    if not _is_number(score) or not math.isfinite(score) or score < 0:
        raise ResultsError(f"{where}: field 'detection_score' must be a finite number >= 0, got {score!r}")
    attr = box["attribute_name"]
    if not isinstance(attr, str) or (attr != "" and attr not in ATTRIBUTE_INDEX):
        raise ResultsError(f"{where}: field 'attribute_name' has unknown attribute {attr!r}")
    if "num_pts" in box and not (_is_number(box["num_pts"]) and box["num_pts"] == int(box["num_pts"])):
        raise ResultsError(f"{where}: field 'num_pts' must be an integer, got {box['num_pts']!r}")


def _slow_scan(source: str, tokens, boxes_of) -> None:
    for t in tokens:
        for i, b in enumerate(boxes_of[t]):
            _check_box(f"{source}: sample {t}, box {i}", t, b)


def parse_results(results: dict, sample_tokens: list, source: str = "results", exact: bool = True,
                  max_boxes: int = DETECTION_CVPR_2019["max_boxes_per_sample"]) -> DetBoxes:
    """Validate the ``results`` mapping and turn it into boxes indexed by ``sample_tokens`` order.

    ``exact``: the results must hold exactly the split's samples (the devkit's rule for official splits);
    otherwise extra samples are ignored (its rule for custom splits). The order of the boxes decides
    ties in score, and follows the devkit's: the file's order of samples for an official split, the
    sample table's (``sample_tokens``) for a custom one; within a sample, the file's order.
    """
    if not isinstance(results, dict):
        raise ResultsError(f"{source}: 'results' must map sample tokens to lists of boxes")
    index = {t: i for i, t in enumerate(sample_tokens)}
    missing = [t for t in sample_tokens if t not in results]
    if missing:
        raise ResultsError(f"{source}: sample {missing[0]} of the split has no entry in 'results' "
                           f"({len(missing)} of {len(sample_tokens)} samples missing; give an empty list for "
                           f"samples without detections)")
    extra = [t for t in results if t not in index]
    if extra and exact:
        raise ResultsError(f"{source}: sample {extra[0]} in 'results' is not in the split ({len(extra)} such "
                           f"samples; the official splits must be matched exactly)")
    # The devkit reads official splits in the file's order, custom splits in the sample table's.
    tokens = list(results) if exact else [t for t in sample_tokens if t in results]
    for t in tokens:
        if not isinstance(results[t], list):
            raise ResultsError(f"{source}: sample {t}: expected a list of boxes, got {type(results[t]).__name__}")
        if len(results[t]) > max_boxes:
            raise ResultsError(f"{source}: sample {t}: {len(results[t])} boxes, at most {max_boxes} are allowed")
    flat = [b for t in tokens for b in results[t]]
    counts = [len(results[t]) for t in tokens]
    n = len(flat)
    try:
        cols = {k: np.array([b[k] for b in flat]) if n else np.zeros((0, _VECTORS[k]) if k in _VECTORS else (0,))
                for k in ("translation", "size", "rotation", "velocity", "detection_score")}
        names = [CLASS_INDEX.get(b["detection_name"], -1) for b in flat]
        attrs = [ATTRIBUTE_INDEX.get(b["attribute_name"], -2) if b["attribute_name"] != "" else -1 for b in flat]
        owners = [b["sample_token"] for b in flat]
        npts = [b.get("num_pts", -1) for b in flat]
    except (KeyError, TypeError, ValueError, AttributeError):
        _slow_scan(source, tokens, results)
        raise  # pragma: no cover  (the scan always finds the culprit)
    ok = n == 0 or (
        all(cols[k].dtype.kind in "iuf" and cols[k].shape == (n, d) for k, d in _VECTORS.items())
        and cols["detection_score"].dtype.kind in "iuf" and cols["detection_score"].shape == (n,)
        and not any(isinstance(b["detection_score"], bool) for b in flat)
        and all(np.isfinite(cols[k]).all() for k in cols) and (cols["detection_score"] >= 0).all()
        and (cols["size"] > 0).all() and (cols["rotation"] != 0).any(axis=1).all()
        and min(names) >= 0 and min(attrs) >= -1
        and owners == [t for t, c in zip(tokens, counts) for _ in range(c)]
        and (set(npts) == {-1} or all(_is_number(x) and x == int(x) for x in npts))
    )
    if not ok:
        _slow_scan(source, tokens, results)
        raise ResultsError(f"{source}: invalid boxes")  # pragma: no cover
    sample = np.repeat(np.array([index[t] for t in tokens], np.int64), counts)
    return DetBoxes(sample=sample, translation=cols["translation"].astype(float).reshape(n, 3),
                    size=cols["size"].astype(float).reshape(n, 3),
                    yaw=quat_yaw(cols["rotation"].astype(float).reshape(n, 4)),
                    velocity=cols["velocity"].astype(float).reshape(n, 2), label=np.array(names, np.int64),
                    score=cols["detection_score"].astype(float).reshape(n), attr=np.array(attrs, np.int64),
                    num_pts=np.array(npts, np.int64))


def _read_json(path: Path):
    """Parse with orjson when it is installed (about twice as fast), else with the standard library, which
    also reads the NaN and Infinity tokens Python writes (orjson refuses them; validation reports them)."""
    raw = path.read_bytes()
    try:
        import orjson
    except ImportError:
        orjson = None
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None


def load_results(path, sample_tokens: list, exact: bool = True) -> tuple[DetBoxes, dict]:
    """Read a results JSON file: the boxes (see ``parse_results``) and its ``meta``."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    data = _read_json(path)
    if not isinstance(data, dict) or "results" not in data:
        raise ResultsError(f"{path}: no field 'results' (the official format is "
                           "{\"meta\": {...}, \"results\": {sample_token: [boxes]}})")
    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: field 'meta' is missing or not an object (the devkit requires it)")
    return parse_results(data["results"], sample_tokens, source=str(path), exact=exact), meta
