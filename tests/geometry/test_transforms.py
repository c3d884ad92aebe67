import numpy as np
import pytest
import torch

from bevkit.geometry import (
    apply,
    inverse,
    make_transform,
    matrix_to_quat,
    project,
    quat_to_matrix,
    quat_to_yaw,
    unproject,
    yaw_to_matrix,
    yaw_to_quat,
)


def test_quaternion_of_a_quarter_turn_about_z():
    q = yaw_to_quat(np.pi / 2)
    np.testing.assert_allclose(q, [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(q) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_matrix_quaternion_round_trip(seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    q = q if q[0] >= 0 else -q
    np.testing.assert_allclose(matrix_to_quat(quat_to_matrix(q)), q, atol=1e-10)


def test_yaw_round_trip_and_matrix():
    for yaw in (-3.0, -1.0, 0.0, 0.7, 3.1):
        assert quat_to_yaw(yaw_to_quat(yaw)) == pytest.approx(yaw)
        np.testing.assert_allclose(yaw_to_matrix(yaw), quat_to_matrix(yaw_to_quat(yaw)), atol=1e-12)


def test_transform_names_compose_and_invert():
    ego_from_cam = make_transform(yaw_to_quat(0.3), [1.0, 2.0, 1.5])
    lidar_from_ego = inverse(make_transform(yaw_to_quat(-1.2), [0.9, 0.0, 1.8]))
    lidar_from_cam = lidar_from_ego @ ego_from_cam
    p_cam = np.array([[0.5, -0.2, 7.0]])
    np.testing.assert_allclose(apply(lidar_from_cam, p_cam), apply(lidar_from_ego, apply(ego_from_cam, p_cam)))
    np.testing.assert_allclose(inverse(lidar_from_cam) @ lidar_from_cam, np.eye(4), atol=1e-12)


def test_hand_computed_point():
    # A sensor 2 m ahead of the ego origin, turned to look left (+90 deg yaw): a point 3 m in
    # front of the sensor is at ego (2, 3, 0).
    ego_from_sensor = make_transform(yaw_to_quat(np.pi / 2), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(apply(ego_from_sensor, np.array([3.0, 0.0, 0.0])), [2.0, 3.0, 0.0], atol=1e-12)


def test_project_then_unproject_is_identity_numpy_and_torch():
    k = np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
    xyz = np.array([[1.0, -0.5, 8.0], [-3.0, 0.2, 20.0]])
    uv, depth = project(k, xyz)
    np.testing.assert_allclose(unproject(k, uv, depth), xyz)
    np.testing.assert_allclose(uv[0], [816.3 + 1266.4 / 8, 491.5 - 0.5 * 1266.4 / 8])
    kt, xt = torch.tensor(k), torch.tensor(xyz)
    uvt, dt = project(kt, xt)
    torch.testing.assert_close(unproject(kt, uvt, dt), xt)
