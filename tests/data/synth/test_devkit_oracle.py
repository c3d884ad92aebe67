"""The nuScenes devkit (installed with --no-deps, never a runtime dependency) as an external oracle."""

import json

import numpy as np
import pytest

nuscenes = pytest.importorskip("nuscenes")

from bevkit.data.synth import render, writer  # noqa: E402
from bevkit.data.synth.schema import token  # noqa: E402
from bevkit.geometry import inverse  # noqa: E402

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def nusc(tiny_root):
    from nuscenes import NuScenes

    return NuScenes("v1.0-mini", str(tiny_root), verbose=False)


def test_devkit_loads_tables_and_maps(nusc, tiny_root):
    from nuscenes.map_expansion import arcline_path_utils
    from nuscenes.map_expansion.map_api import NuScenesMap

    assert len(nusc.sample) == 12 and len(nusc.scene) == 2
    for location in ("boston-seaport", "singapore-onenorth"):
        m = NuScenesMap(str(tiny_root), location)
        scene = next(s for s in nusc.scene if nusc.get("log", s["log_token"])["location"] == location)
        sample = nusc.get("sample", scene["first_sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        x, y = pose["translation"][:2]
        near = m.get_records_in_radius(x, y, 30, ["lane", "ped_crossing", "road_divider", "lane_divider"])
        assert near["lane"] and near["lane_divider"]
        # The ego stands on a lane or a connector, and lane centre lines follow the lane polygons.
        lane = m.get_closest_lane(x, y, radius=5)
        assert lane
        poses = np.array(arcline_path_utils.discretize_lane(m.get_arcline_path(lane), 0.5))
        assert np.hypot(poses[:, 0] - x, poses[:, 1] - y).min() < 1.0
        # The map mask in the map table marks the ego's position as drivable.
        map_rec = nusc.get("map", nusc.get("log", scene["log_token"])["map_token"])
        assert map_rec["mask"].is_on_mask(np.array([x]), np.array([y]))[0]


def test_ground_truth_as_predictions_scores_one(nusc, tmp_path):
    from nuscenes.eval.common.loaders import load_gt
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    gt = load_gt(nusc, "mini_val", DetectionBox, verbose=False)
    results = {
        t: [dict(sample_token=t, translation=list(b.translation), size=list(b.size), rotation=list(b.rotation),
                 velocity=[float(v) if np.isfinite(v) else 0.0 for v in b.velocity], detection_name=b.detection_name,
                 detection_score=1.0, attribute_name=b.attribute_name)
            for b in gt[t] if b.num_pts > 0]
        for t in gt.sample_tokens
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False,
                                             use_external=False), "results": results}))
    ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "mini_val", str(tmp_path),
                       verbose=False)
    metrics, _ = ev.evaluate()
    m = metrics.serialize()
    assert m["mean_ap"] == pytest.approx(1.0)
    assert m["nd_score"] == pytest.approx(1.0)
    for name, ap in m["mean_dist_aps"].items():
        assert ap == pytest.approx(1.0), name


def test_devkit_boxes_project_onto_rendered_objects(nusc, tiny_root):
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    scene = next(s for s in nusc.scene if s["name"] == "scene-0103")
    job = next(j for j in writer.scene_jobs(tiny_root, "tiny") if j.name == scene["name"])
    city, scn = writer.scene_world(job)
    agent_of = {token(job.seed, "instance", job.name, a.id): a.id for a in scn.agents}
    rig = writer.load_rig(job.scale)
    checked = hits = 0
    sample = nusc.get("sample", scene["first_sample_token"])
    while sample:
        step = int(round((sample["timestamp"] - job.start_us) / 1e6 / 0.05))
        prims = render.scene_prims(scn, step, (scn.ego_x[step], scn.ego_y[step]), 200.0, {})
        for channel in ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT", "CAM_BACK_RIGHT"):
            sd_token = sample["data"][channel]
            _, boxes, k = nusc.get_sample_data(sd_token, box_vis_level=BoxVisibility.ALL)
            sd = nusc.get("sample_data", sd_token)
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            from bevkit.geometry import make_transform

            city_from_cam = inverse(city.global_from_city) @ make_transform(pose["rotation"], pose["translation"]) \
                @ make_transform(cs["rotation"], cs["translation"])
            cam = rig.camera(channel)
            ids, _ = render.cast_camera(prims, city_from_cam, cam.intrinsics, cam.width, cam.height,
                                        render.camera_rays(cam.intrinsics, cam.width, cam.height))
            owner = np.where(ids.prim >= 0, prims.owner[ids.prim], -1).reshape(cam.height, cam.width)
            for box in boxes:
                ann = nusc.get("sample_annotation", box.token)
                if ann["visibility_token"] != "4" or box.center[2] > 45:
                    continue
                u, v = view_points(box.center[:, None], k, normalize=True)[:2, 0]
                checked += 1
                hits += int(owner[int(round(v)), int(round(u))] == agent_of[ann["instance_token"]])
        sample = nusc.get("sample", sample["next"]) if sample["next"] else None
    assert checked >= 20
    assert hits / checked > 0.95


def test_num_lidar_pts_equals_the_devkits_points_in_box(nusc, tiny_root):
    """``num_lidar_pts`` of every keyframe annotation, counted again by the devkit's ``points_in_box`` in the
    LiDAR frame (an implementation independent of the writer's)."""
    from nuscenes.utils.geometry_utils import points_in_box

    checked = nonzero = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])  # boxes in the LiDAR frame
        pts = np.fromfile(path, dtype=np.float32).reshape(-1, 5)[:, :3].T
        for box in boxes:
            count = int(points_in_box(box, pts).sum())
            assert count == nusc.get("sample_annotation", box.token)["num_lidar_pts"], box.token
            checked += 1
            nonzero += count > 0
    assert checked > 50 and nonzero > 20
