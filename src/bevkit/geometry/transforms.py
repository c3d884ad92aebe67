"""Rigid transforms: quaternions ([w, x, y, z], as nuScenes stores them), yaw and 4x4 matrices.

A 4x4 matrix is named for the frames it joins, ``dst_from_src``, so that
``lidar_from_cam = lidar_from_ego @ ego_from_cam`` reads left to right. Yaw is counter-clockwise
about +z from +x, in radians. These helpers work on numpy arrays; they are used by the data layer
and the synthetic world, which work in numpy before anything becomes a tensor.
"""

from __future__ import annotations

import numpy as np


def quat_to_matrix(q) -> np.ndarray:
    """Rotation matrix of a unit quaternion.

    Shapes:
        q: (..., 4) as [w, x, y, z]   returns: (..., 3, 3)
    """
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    r = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )
    return r.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(r) -> np.ndarray:
    """Unit quaternion [w, x, y, z] of a rotation matrix, with w >= 0.

    Shapes:
        r: (3, 3)   returns: (4,)
    """
    r = np.asarray(r, dtype=np.float64)
    trace = np.trace(r)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + r[i, i] - r[j, j] - r[k, k])
        q = [0.0, 0.0, 0.0, 0.0]
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q = np.asarray(q)
    q = q / np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def yaw_to_quat(yaw) -> np.ndarray:
    """Quaternion [w, x, y, z] of a rotation by ``yaw`` about +z.

    Shapes:
        yaw: (...)   returns: (..., 4)
    """
    yaw = np.asarray(yaw, dtype=np.float64)
    zeros = np.zeros_like(yaw)
    return np.stack([np.cos(yaw / 2), zeros, zeros, np.sin(yaw / 2)], axis=-1)


def quat_to_yaw(q) -> np.ndarray:
    """Yaw of the rotated +x axis projected on the xy plane (as the nuScenes devkit defines it).

    Shapes:
        q: (..., 4)   returns: (...)
    """
    r = quat_to_matrix(q)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def yaw_to_matrix(yaw) -> np.ndarray:
    """Rotation matrix about +z.

    Shapes:
        yaw: (...)   returns: (..., 3, 3)
    """
    yaw = np.asarray(yaw, dtype=np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    zeros, ones = np.zeros_like(yaw), np.ones_like(yaw)
    return np.stack([c, -s, zeros, s, c, zeros, zeros, zeros, ones], axis=-1).reshape(yaw.shape + (3, 3))


def make_transform(rotation, translation) -> np.ndarray:
    """4x4 rigid transform from a rotation (3x3 matrix or [w, x, y, z] quaternion) and a translation.

    Shapes:
        rotation: (3, 3) or (4,)   translation: (3,)   returns: (4, 4)
    """
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape == (4,):
        rotation = quat_to_matrix(rotation)
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = np.asarray(translation, dtype=np.float64)
    return t


def inverse(t) -> np.ndarray:
    """Inverse of a rigid 4x4 transform: ``src_from_dst`` from ``dst_from_src``.

    Shapes:
        t: (..., 4, 4)   returns: (..., 4, 4)
    """
    t = np.asarray(t, dtype=np.float64)
    r = np.swapaxes(t[..., :3, :3], -1, -2)
    out = np.zeros_like(t)
    out[..., :3, :3] = r
    out[..., :3, 3] = -(r @ t[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def apply(t, xyz):
    """Apply a 4x4 transform to points: ``xyz_dst = apply(dst_from_src, xyz_src)``.

    Works on numpy arrays and torch tensors alike.

    Shapes:
        t: (4, 4)   xyz: (..., 3)   returns: (..., 3)
    """
    return xyz @ t[:3, :3].T + t[:3, 3]
