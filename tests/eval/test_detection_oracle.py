"""bevkit's detection metrics against the nuScenes devkit's DetectionEval (an external oracle, --no-deps)."""

import json
import math

import numpy as np
import pytest

from bevkit.eval.perturb import KINDS, make_results
from bevkit.eval.score import score

pytestmark = pytest.mark.oracle


def flatten(summary: dict) -> dict:
    """Every figure: mAP, NDS, AP per class and threshold, TP error per class, mean TP errors and scores."""
    out = {"mean_ap": summary["mean_ap"], "nd_score": summary["nd_score"]}
    for c, aps in summary["label_aps"].items():
        for th, v in aps.items():
            out[f"ap/{c}/{float(th)}"] = v
        out[f"mean_dist_ap/{c}"] = summary["mean_dist_aps"][c]
    for c, errs in summary["label_tp_errors"].items():
        for m, v in errs.items():
            out[f"tp/{c}/{m}"] = v
    for m in summary["tp_errors"]:
        out[f"tp_errors/{m}"] = summary["tp_errors"][m]
        out[f"tp_scores/{m}"] = summary["tp_scores"][m]
    return out


def devkit_summary(nusc, path, out_dir, class_range=None):
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionConfig
    from nuscenes.eval.detection.evaluate import DetectionEval

    cfg = config_factory("detection_cvpr_2019")
    if class_range is not None:  # the devkit's own way to change ranges: a config with other class_range
        cfg = DetectionConfig.deserialize({**cfg.serialize(), "class_range": class_range})
    ev = DetectionEval(nusc, cfg, str(path), "mini_val", str(out_dir), verbose=False)
    metrics, _ = ev.evaluate()
    return json.loads(json.dumps(metrics.serialize()))


def assert_same(ours: dict, ref: dict):
    a, b = flatten(ours), flatten(ref)
    assert set(a) == set(b)
    bad = {k: (a[k], b[k]) for k in b
           if not ((math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= 1e-6)}
    assert not bad, bad


@pytest.mark.parametrize("kind", KINDS)
def test_every_figure_matches_the_devkit(kind, nusc, tables, tiny_root, tmp_path):
    results = make_results(tables, "mini_val", kind, seed=3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    ref = devkit_summary(nusc, path, tmp_path / "devkit")
    ours = score(path, tiny_root, "v1.0-mini", "mini_val", None)
    assert_same(ours, ref)
    # The case is informative: not all-perfect, not all-zero (except random boxes, which match nothing).
    if kind != "random":
        assert 0.05 < ref["mean_ap"] and ref["nd_score"] < 0.999


def test_capped_class_ranges_match_the_devkit_with_those_ranges(nusc, tables, tiny_root, tmp_path):
    from bevkit.eval.detection import DETECTION_CVPR_2019

    results = make_results(tables, "mini_val", "mixed", seed=4)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    capped = {c: min(r, 15.0) for c, r in DETECTION_CVPR_2019["class_range"].items()}
    ref = devkit_summary(nusc, path, tmp_path / "devkit", class_range=capped)
    ours = score(path, tiny_root, "v1.0-mini", "mini_val", None, max_range=15.0)
    assert_same(ours, ref)
    assert ours["cfg"]["class_range"] == capped
    # The cap changes the figures (so the check above is not the uncapped benchmark twice).
    full = score(path, tiny_root, "v1.0-mini", "mini_val", None)
    assert abs(full["mean_ap"] - ours["mean_ap"]) > 1e-3


def test_ground_truth_with_points_scores_one(nusc, tables, tiny_root, tmp_path):
    from bevkit.eval.perturb import gt_boxes

    # Keep only boxes the benchmark keeps as GT (points inside): every figure is then perfect.
    results = make_results(tables, "mini_val", "gt")
    kept = {t: [{k: v for k, v in b.items() if k != "num_lidar_pts"} for b in boxes if b["num_lidar_pts"] > 0]
            for t, boxes in gt_boxes(tables, "mini_val").items()}
    results["results"] = kept
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    ours = score(path, tiny_root, "v1.0-mini", "mini_val", None)
    assert ours["mean_ap"] == pytest.approx(1.0) and ours["nd_score"] == pytest.approx(1.0)
    assert_same(ours, devkit_summary(nusc, path, tmp_path / "devkit"))


def test_padded_to_500_boxes_matches_the_devkit(nusc, tables, tiny_root, tmp_path):
    results = make_results(tables, "mini_val", "mixed", seed=5, boxes_per_sample=500)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert_same(score(path, tiny_root, "v1.0-mini", "mini_val", None), devkit_summary(nusc, path, tmp_path / "dk"))


def test_in_memory_predictions_match_the_devkit(nusc, tables, tiny_root, tmp_path):
    """Ego-frame tensors through DetectionEvaluator, against the devkit on the same boxes written as a file."""
    import torch

    from bevkit.data.nuscenes import DETECTION_CLASSES
    from bevkit.eval.evaluator import DetectionEvaluator, boxes_to_results
    from bevkit.eval.groundtruth import load_detection_gt
    from bevkit.geometry import inverse, quat_to_yaw

    gt = load_detection_gt(tables, "mini_val")
    results = make_results(tables, "mini_val", "jitter", seed=7)["results"]
    ev = DetectionEvaluator(gt)
    written = {}
    for i, token in enumerate(gt.sample_tokens):
        boxes = results[token]
        ego_from_global = inverse(gt.global_from_ego[i])
        rows = []
        for b in boxes:
            c = ego_from_global[:3, :3] @ np.array(b["translation"]) + ego_from_global[:3, 3]
            # Ego yaw of the global box (exact for level poses; either way the devkit scores the same tensors).
            ego_yaw = np.arctan2(gt.global_from_ego[i][1, 0], gt.global_from_ego[i][0, 0])
            yaw = float(quat_to_yaw(b["rotation"]) - ego_yaw)
            v = ego_from_global[:3, :3] @ np.array([*b["velocity"], 0.0])
            w, l, h = b["size"]
            rows.append([*c, l, w, h, yaw, v[0], v[1]])
        boxes_t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 9)
        scores = torch.tensor([b["detection_score"] for b in boxes], dtype=torch.float64)
        labels = torch.tensor([DETECTION_CLASSES.index(b["detection_name"]) for b in boxes])
        attrs = [b["attribute_name"] for b in boxes]
        ev.add(token, boxes_t, scores, labels, attrs)
        written[token] = boxes_to_results(token, boxes_t, scores, labels, gt.global_from_ego[i], attrs)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"use_camera": True}, "results": written}))
    ref = devkit_summary(nusc, path, tmp_path / "devkit")
    ours = ev.compute().summary
    assert_same(ours, ref)
    assert 0.05 < ours["mean_ap"] < 0.99
    # The boxes went ego -> global through bevkit's conversion on both sides above; the devkit also scores
    # the original global boxes the test converted to ego by hand, so a fault in that conversion shows.
    path.write_text(json.dumps({"meta": {"use_camera": True}, "results": results}))
    assert_same(ours, devkit_summary(nusc, path, tmp_path / "devkit-original"))
    for token, boxes in written.items():
        for ours_box, box in zip(boxes, results[token], strict=True):
            for key in ("translation", "size", "velocity"):
                np.testing.assert_allclose(ours_box[key], box[key], rtol=0, atol=1e-9)
            turn = quat_to_yaw(ours_box["rotation"]) - quat_to_yaw(box["rotation"])
            assert abs(np.sin(turn)) < 1e-9 and np.cos(turn) > 0


def test_custom_split_breaks_score_ties_in_sample_table_order(tables, tiny_root, tmp_path):
    """For a custom split the devkit reads the results in the sample table's order, whatever the file's
    order; with every score tied, that order decides the matching."""
    import shutil
    from contextlib import redirect_stdout
    from io import StringIO

    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    root = tmp_path / "data"
    shutil.copytree(tiny_root / "v1.0-mini", root / "v1.0-mini")
    (root / "maps").symlink_to(tiny_root / "maps", target_is_directory=True)  # the devkit loads map masks
    splits = json.loads((root / "v1.0-mini" / "splits.json").read_text())
    splits["custom_val"] = splits["mini_val"]
    (root / "v1.0-mini" / "splits.json").write_text(json.dumps(splits))
    results = make_results(tables, "mini_val", "mixed", seed=1)
    for boxes in results["results"].values():
        for b in boxes:
            b["detection_score"] = 0.5
    results["results"] = dict(reversed(list(results["results"].items())))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with redirect_stdout(StringIO()):
        nusc = NuScenes("v1.0-mini", str(root), verbose=False)
        ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "custom_val",
                           str(tmp_path / "devkit"), verbose=False)
        ref = json.loads(json.dumps(ev.evaluate()[0].serialize()))
    assert_same(score(path, root, "v1.0-mini", "custom_val", None), ref)
    # The file's order gives other figures: the case tests the order.
    official = score(path, root, "v1.0-mini", "mini_val", None)
    assert abs(official["mean_ap"] - ref["mean_ap"]) > 1e-4


def test_the_benchmark_configuration_cannot_be_changed_through_a_summary(tables, tiny_root, tmp_path):
    from bevkit.eval.detection import DETECTION_CVPR_2019, detection_config

    results = make_results(tables, "mini_val", "mixed", seed=1)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    first = score(path, tiny_root, "v1.0-mini", "mini_val", None)
    first["cfg"]["class_range"]["car"] = 5
    detection_config()["class_range"]["truck"] = 5
    assert DETECTION_CVPR_2019["class_range"]["car"] == 50 and DETECTION_CVPR_2019["class_range"]["truck"] == 50
    again = score(path, tiny_root, "v1.0-mini", "mini_val", None)
    assert again["mean_ap"] == first["mean_ap"]


def test_ground_truth_reads_tables_without_radar_counts(tiny_root, tmp_path):
    """``num_radar_pts`` is optional in nuScenes-format tables (check-data accepts its absence): the ground
    truth then counts LiDAR points only, and drops the same boxes when they are zero."""
    import shutil

    from bevkit.data.nuscenes import NuScenesTables
    from bevkit.eval.groundtruth import load_detection_gt

    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    table = data / "v1.0-mini" / "sample_annotation.json"
    anns = json.loads(table.read_text())
    assert all(a["num_radar_pts"] == 0 for a in anns)  # the synthetic world has no radar
    table.write_text(json.dumps([{k: v for k, v in a.items() if k != "num_radar_pts"} for a in anns]))
    with_radar = load_detection_gt(NuScenesTables(tiny_root, "v1.0-mini"), "mini_val")
    without = load_detection_gt(NuScenesTables(data, "v1.0-mini"), "mini_val")
    assert len(without.boxes.num_pts) == len(with_radar.boxes.num_pts) > 0
    np.testing.assert_array_equal(without.boxes.num_pts, with_radar.boxes.num_pts)
