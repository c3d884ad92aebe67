"""The reader against the nuScenes devkit (an oracle only, installed with --no-deps)."""

import numpy as np
import pytest

nuscenes = pytest.importorskip("nuscenes")

from bevkit.data.nuscenes import NuScenesIndex, box_corners  # noqa: E402
from bevkit.geometry import apply, inverse, matrix_to_quat, project, yaw_to_matrix  # noqa: E402

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def nusc(tiny_root):
    from nuscenes import NuScenes

    return NuScenes("v1.0-mini", str(tiny_root), verbose=False)


@pytest.fixture(scope="module")
def index(tiny_root, tmp_path_factory):
    return NuScenesIndex.load(tiny_root, cache_dir=tmp_path_factory.mktemp("cache"))


def test_boxes_back_to_global_equal_the_table(nusc, index):
    n = 0
    for s in index.samples:
        g_from_e = np.array(s["global_from_ego"])
        for tok, box in zip(s["anns"]["token"], s["anns"]["boxes"]):
            ann = nusc.get("sample_annotation", tok)
            b = np.array([np.nan if v is None else v for v in box])
            centre = apply(g_from_e, b[:3])
            rot = g_from_e[:3, :3] @ yaw_to_matrix(b[6])
            q = matrix_to_quat(rot)
            q_ref = np.array(ann["rotation"])
            assert np.allclose(centre, ann["translation"], atol=1e-6)
            assert np.allclose([b[4], b[3], b[5]], ann["size"], atol=1e-9)  # [w, l, h]
            assert min(np.abs(q - q_ref).max(), np.abs(q + q_ref).max()) < 1e-6
            n += 1
    assert n > 300


def test_velocities_equal_box_velocity(nusc, index):
    n = 0
    for s in index.samples:
        e_from_g = inverse(np.array(s["global_from_ego"]))
        for tok, box in zip(s["anns"]["token"], s["anns"]["boxes"]):
            ref = nusc.box_velocity(tok)
            if np.isnan(ref).any():
                assert box[7] is None and box[8] is None
                continue
            ref_ego = e_from_g[:3, :3] @ ref
            np.testing.assert_allclose(box[7:9], ref_ego[:2], atol=1e-6)
            n += 1
    assert n > 300


def test_box_corners_project_like_the_devkit(nusc, index):
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    n = 0
    for s in index.samples[::2]:
        sample = nusc.get("sample", s["token"])
        for ch, cam in s["cams"].items():
            _, boxes, k = nusc.get_sample_data(sample["data"][ch], box_vis_level=BoxVisibility.ANY)
            ours = {tok: np.array([np.nan if v is None else v for v in b])
                    for tok, b in zip(s["anns"]["token"], s["anns"]["boxes"])}
            cam_from_ego = inverse(np.array(cam["ego_from_cam"]))
            for box in boxes:
                ref = view_points(box.corners(), k, normalize=True)[:2].T  # (8, 2)
                uv, _ = project(np.array(cam["intrinsics"]), apply(cam_from_ego, box_corners(ours[box.token])))
                # Same corners, maybe in another order: compare as sets.
                d = np.linalg.norm(ref[:, None] - uv[None], axis=-1)
                assert d.min(axis=1).max() < 1e-4
                n += 1
    assert n > 100
