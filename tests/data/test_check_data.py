"""check-data: wrongly typed or shaped fields, truncated sweeps, --max-problems and input that is not a dataset."""

import json
import shutil

import pytest

from bevkit.cli import main
from bevkit.data.check import check_dataset

VERSION = "v1.0-mini"
K = [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]


@pytest.fixture
def tables(tiny_root, tmp_path):
    """A dataset root with a copy of the tiny dataset's tables only (check them with check_files=False)."""
    shutil.copytree(tiny_root / VERSION, tmp_path / VERSION)
    return tmp_path


def _rows(root, table):
    return json.loads((root / VERSION / f"{table}.json").read_text())


def _edit(root, table, pick, field, value):
    """Set ``field`` of the first record ``pick`` accepts; returns that record's token."""
    rows = _rows(root, table)
    row = next(r for r in rows if pick(r))
    row[field] = value
    (root / VERSION / f"{table}.json").write_text(json.dumps(rows))
    return row["token"]


def _any(r):
    return True


def _camera(r):
    return r["camera_intrinsic"] != []


def _not_camera(r):
    return r["camera_intrinsic"] == []


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("table, pick, field, value, expected", [
    ("sample_annotation", _any, "rotation", "x", 'expected 4 numbers [w, x, y, z], got "x"'),
    ("sample", _any, "timestamp", "abc", 'expected an integer, got "abc"'),
    ("ego_pose", _any, "translation", [0, 0], "expected 3 numbers [x, y, z], got [0, 0]"),
    ("sample_data", _any, "timestamp", None, "expected an integer, got null"),
    ("sample_data", _any, "timestamp", 1.5e15, "expected an integer"),
    ("calibrated_sensor", _camera, "camera_intrinsic", [[1, 0], [0, 1]], "expected a 3x3 matrix (cameras) or []"),
    ("calibrated_sensor", _camera, "camera_intrinsic", [], "expected a 3x3 matrix for camera sensor CAM_"),
    ("calibrated_sensor", _not_camera, "camera_intrinsic", K, "expected [] for lidar sensor LIDAR_TOP"),
    ("calibrated_sensor", _any, "translation", [0, 0, "1"], "expected 3 numbers"),
    ("ego_pose", _any, "rotation", [1, 0, 0], "expected 4 numbers"),
    ("sample_annotation", _any, "size", [1.0, 0.0, 2.0], "expected 3 positive numbers [w, l, h]"),
    ("sample_annotation", _any, "translation", {"x": 1}, "expected 3 numbers"),
    ("sample_annotation", _any, "num_lidar_pts", -1, "expected a non-negative integer, got -1"),
    ("sample_annotation", _any, "num_radar_pts", 1.5, "expected a non-negative integer"),
    ("sample_annotation", _any, "attribute_tokens", "abc", "expected a list of token strings"),
    ("sample_annotation", _any, "visibility_token", ["x"], "expected a string"),
    ("sample_data", _any, "sample_token", ["x"], "expected a string"),
    ("sample_data", _any, "is_key_frame", 1, "expected true or false"),
    ("sample_data", _any, "height", -1, "expected a non-negative integer"),
    ("sample_data", _any, "filename", None, "expected a string"),
    ("sample", _any, "next", None, "expected a string"),
    ("scene", _any, "nbr_samples", "6", "expected a non-negative integer"),
    ("instance", _any, "nbr_annotations", True, "expected a non-negative integer, got true"),
    ("log", _any, "location", 3, "expected a string"),
    ("map", _any, "log_tokens", [1], "expected a list of token strings"),
])
def test_a_wrong_field_is_one_problem_naming_its_record(tables, table, pick, field, value, expected):
    token = _edit(tables, table, pick, field, value)
    rep = check_dataset(tables, check_files=False)
    # One problem, nothing cascading from the record set aside (links to it, chains, counts).
    assert [p.severity for p in rep.problems] == ["error"], [str(p) for p in rep.problems]
    text = str(rep.problems[0])
    assert f"{VERSION}/{table}.json: {table}[{token}].{field}: " in text and expected in text, text


def test_wrong_types_are_reported_by_the_cli_not_a_traceback(tables, capsys):
    ann = _edit(tables, "sample_annotation", _any, "rotation", "x")
    sample = _edit(tables, "sample", _any, "timestamp", "abc")
    code, _, err = _run(capsys, "check-data", str(tables), "--skip-files")
    assert code == 1 and "Traceback" not in err
    assert f"sample_annotation.json: sample_annotation[{ann}].rotation: expected 4 numbers" in err
    assert f"sample.json: sample[{sample}].timestamp: expected an integer" in err


def test_records_shaped_as_in_real_nuscenes_pass(tables):
    # A radar as in nuScenes: camera_intrinsic [], a .pcd sample_data of width and height 0; an
    # annotation without visibility ("" in nuScenes), without LiDAR points and without num_radar_pts.
    sensors = _rows(tables, "sensor") + [{"token": "r" * 32, "channel": "RADAR_FRONT", "modality": "radar"}]
    (tables / VERSION / "sensor.json").write_text(json.dumps(sensors))
    cs = _rows(tables, "calibrated_sensor")
    cs.append({"token": "c" * 32, "sensor_token": "r" * 32, "translation": [3.412, 0.0, 0.5],
               "rotation": [0.9999, 0.0, 0.0, 0.0141], "camera_intrinsic": []})
    (tables / VERSION / "calibrated_sensor.json").write_text(json.dumps(cs))
    sd = _rows(tables, "sample_data")
    key = next(r for r in sd if r["is_key_frame"])
    sd.append(dict(key, token="d" * 32, calibrated_sensor_token="c" * 32, fileformat="pcd", width=0, height=0,
                   filename="samples/RADAR_FRONT/x.pcd", prev="", next=""))
    (tables / VERSION / "sample_data.json").write_text(json.dumps(sd))
    anns = _rows(tables, "sample_annotation")
    anns[0].update(visibility_token="", num_lidar_pts=0)
    del anns[0]["num_radar_pts"]
    (tables / VERSION / "sample_annotation.json").write_text(json.dumps(anns))
    rep = check_dataset(tables, check_files=False)
    assert rep.problems == [], [str(p) for p in rep.problems]


def test_truncated_lidar_files(tiny_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    lidar = [r for r in _rows(root, "sample_data") if r["filename"].endswith(".pcd.bin")]
    assert len(lidar) >= 10
    cut = {lidar[0]["token"]: 1000, lidar[3]["token"]: 1003, lidar[6]["token"]: 0}
    for r in lidar:
        if r["token"] in cut:
            with open(root / r["filename"], "r+b") as f:
                f.truncate(cut[r["token"]])
    rep = check_dataset(root)
    found = {p.token: p for p in rep.problems}
    assert len(rep.problems) == 3 and set(found) == set(cut), [str(p) for p in rep.problems]
    # 1000 bytes is 50 whole points: a warning (cannot be told from a sparse sweep), not an error.
    sparse = found[lidar[0]["token"]]
    assert sparse.severity == "warning" and sparse.file == str(root / lidar[0]["filename"])
    assert "50 points, under a tenth" in sparse.message and "LIDAR_TOP" in sparse.message
    assert found[lidar[3]["token"]].severity == "error" and "1003 bytes" in found[lidar[3]["token"]].message
    assert found[lidar[6]["token"]].severity == "error" and found[lidar[6]["token"]].message == "file is empty"

    # Warnings alone exit 0 and are printed.
    with open(root / lidar[3]["filename"], "r+b") as f:
        f.truncate(2000)
    (root / lidar[6]["filename"]).write_bytes(b"\0" * 20 * 500)
    code, out, err = _run(capsys, "check-data", str(root))
    assert code == 0 and "0 error(s), 3 warning(s)" in out
    assert f"warning: {root / lidar[0]['filename']}: sample_data[{lidar[0]['token']}].filename: 50 points" in err


def test_max_problems(tables, capsys):
    code, out, err = _run(capsys, "check-data", str(tables), "--skip-files", "--max-problems", "-1")
    assert code == 2 and err == "bevkit: error: --max-problems must be at least 0, got -1\n" and out == ""
    code, out, err = _run(capsys, "check-data", str(tables), "--skip-files")
    assert code == 0 and err == "" and "0 error(s), 0 warning(s)" in out
    _edit(tables, "sample_annotation", _any, "num_lidar_pts", -1)
    _edit(tables, "ego_pose", _any, "timestamp", "abc")
    _edit(tables, "sample", _any, "timestamp", "abc")
    code, out, err = _run(capsys, "check-data", str(tables), "--skip-files", "--max-problems", "0")
    assert code == 1 and err == "... and 3 more\n" and "3 error(s), 0 warning(s)" in out
    code, out, err = _run(capsys, "check-data", str(tables), "--skip-files", "--max-problems", "2")
    assert code == 1 and err.splitlines()[-1] == "... and 1 more" and len(err.splitlines()) == 3


def test_not_a_dataset_is_a_one_line_error(tiny_root, tables, tmp_path, capsys):
    two = tmp_path / "two"
    for version in ("v1.0-mini", "v1.0-trainval"):
        (two / version).mkdir(parents=True)
        (two / version / "sample.json").write_text("[]")
    (tmp_path / "empty").mkdir()
    for argv, needle in (([str(tmp_path / "nope")], "no such dataset folder"),
                         ([str(two)], "several versions (v1.0-mini, v1.0-trainval); name one with --version"),
                         ([str(tmp_path / "empty")], "no version folder with nuScenes tables"),
                         ([str(tiny_root), "--version", "v9"], "v9: no such version folder"),
                         ([str(tiny_root), "--version", "samples"], "no nuScenes tables in this folder")):
        code, out, err = _run(capsys, "check-data", *argv)
        assert code == 2 and err.startswith("bevkit: error: ") and needle in err, (argv, err)
        assert err.count("\n") == 1 and "error(s)" not in out
    # Found, but with problems: exit 1, every problem listed.
    (tables / VERSION / "scene.json").write_text("[")
    code, out, err = _run(capsys, "check-data", str(tables), "--skip-files")
    assert code == 1 and "scene.json: scene.-: not valid JSON" in err and "1 error(s)" in out
