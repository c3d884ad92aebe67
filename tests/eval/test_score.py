"""``score``: results-file validation (clear errors naming sample and field) and the files it writes."""

import copy
import json

import pytest

from bevkit.data.nuscenes import DataError
from bevkit.eval import ResultsError
from bevkit.eval.perturb import make_results
from bevkit.eval.score import format_summary, score


@pytest.fixture(scope="module")
def good(tables):
    return make_results(tables, "mini_val", "jitter", seed=0)


def first(results):
    token = next(t for t, boxes in results["results"].items() if boxes)
    return token, results["results"][token][0]


def write(tmp_path, data):
    path = tmp_path / "results.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("field, value, words", [
    ("detection_name", "spaceship", ["detection_name", "unknown class", "'spaceship'"]),
    ("translation", [1.0, 2.0], ["translation", "3 numbers", "2 values"]),
    ("size", [1.0, float("nan"), 2.0], ["size", "not finite"]),
    ("velocity", [float("nan"), 0.0], ["velocity", "not finite"]),
    ("rotation", [0.0, 0.0, 0.0, 0.0], ["rotation", "zero quaternion"]),
    ("size", [1.0, 0.0, 2.0], ["size", "positive"]),
    ("detection_score", "high", ["detection_score"]),
    ("detection_score", -0.5, ["detection_score", ">= 0", "-0.5"]),
    ("detection_score", True, ["detection_score", "True"]),
    ("attribute_name", "vehicle.flying", ["attribute_name", "vehicle.flying"]),
    ("sample_token", "elsewhere", ["sample_token", "elsewhere"]),
])
def test_bad_box_names_sample_and_field(good, tiny_root, tmp_path, field, value, words):
    data = copy.deepcopy(good)
    token, box = first(data)
    box[field] = value
    with pytest.raises(ResultsError) as e:
        score(write(tmp_path, data), tiny_root, "v1.0-mini", "mini_val", None)
    msg = str(e.value)
    for w in [token, "box 0", *words]:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("field", ["velocity", "sample_token"])
def test_missing_field_is_named(good, tiny_root, tmp_path, field):
    data = copy.deepcopy(good)
    token, box = first(data)
    del box[field]
    with pytest.raises(ResultsError, match=f"sample {token}, box 0: field '{field}' is missing"):
        score(write(tmp_path, data), tiny_root, "v1.0-mini", "mini_val", None)


def test_missing_extra_and_crowded_samples(good, tiny_root, tmp_path):
    data = copy.deepcopy(good)
    token = next(iter(data["results"]))
    del data["results"][token]
    with pytest.raises(ResultsError, match=f"sample {token} of the split has no entry"):
        score(write(tmp_path, data), tiny_root, "v1.0-mini", "mini_val", None)
    data = copy.deepcopy(good)
    data["results"]["not-a-sample"] = []
    with pytest.raises(ResultsError, match="sample not-a-sample in 'results' is not in the split"):
        score(write(tmp_path, data), tiny_root, "v1.0-mini", "mini_val", None)
    data = copy.deepcopy(good)
    token, box = first(data)
    data["results"][token] = [box] * 501
    with pytest.raises(ResultsError, match=f"sample {token}: 501 boxes, at most 500"):
        score(write(tmp_path, data), tiny_root, "v1.0-mini", "mini_val", None)


def test_bad_files(good, tiny_root, tmp_path):
    with pytest.raises(ResultsError, match="not valid JSON"):
        score(write(tmp_path, "{not json"), tiny_root, "v1.0-mini", "mini_val", None)
    with pytest.raises(ResultsError, match="no field 'results'"):
        score(write(tmp_path, {"meta": {}}), tiny_root, "v1.0-mini", "mini_val", None)
    with pytest.raises(ResultsError, match="no such results file"):
        score(tmp_path / "absent.json", tiny_root, "v1.0-mini", "mini_val", None)
    with pytest.raises(DataError, match="unknown split 'nope'"):
        score(write(tmp_path, good), tiny_root, "v1.0-mini", "nope", None)


def test_a_ground_truth_attribute_outside_the_benchmark_is_refused(good, tiny_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_root / "v1.0-mini", root / "v1.0-mini")
    path = root / "v1.0-mini" / "attribute.json"
    attributes = json.loads(path.read_text())
    for a in attributes:
        if a["name"] == "vehicle.parked":
            a["name"] = "vehicle.hovering"
    path.write_text(json.dumps(attributes))
    with pytest.raises(DataError, match="attribute 'vehicle.hovering' is not one of the detection benchmark's"):
        score(write(tmp_path, good), root, "v1.0-mini", "mini_val", None)


def test_writes_the_devkit_summary_keys_and_pr_curves(good, tiny_root, tmp_path):
    summary = score(write(tmp_path, good), tiny_root, "v1.0-mini", "mini_val", tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert set(on_disk) == {"label_aps", "mean_dist_aps", "mean_ap", "label_tp_errors", "tp_errors", "tp_scores",
                            "nd_score", "eval_time", "cfg", "meta"}
    assert on_disk["mean_ap"] == summary["mean_ap"] and set(on_disk["label_aps"]["car"]) == {"0.5", "1.0", "2.0", "4.0"}
    details = json.loads((tmp_path / "out" / "metrics_details.json").read_text())
    assert len(details) == 40 and len(details["car:2.0"]["precision"]) == 101
    pngs = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert len(pngs) == 14 and "car_pr.png" in pngs and "dist_pr_2.0.png" in pngs
    assert (tmp_path / "out" / "plots" / "car_pr.png").read_bytes()[:4] == b"\x89PNG"
    table = format_summary(summary)
    assert f"mAP: {summary['mean_ap']:.4f}" in table and "traffic_cone" in table
