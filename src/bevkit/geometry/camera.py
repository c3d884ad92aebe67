"""Pinhole camera: projection from the ``cam`` frame (x right, y down, z forward) to pixels and back."""

from __future__ import annotations


def project(intrinsics, xyz_cam):
    """Project camera-frame points to pixel coordinates (pixel centres at integer coordinates).

    Works on numpy arrays and torch tensors alike. Points behind the camera get a negative depth;
    callers mask them.

    Shapes:
        intrinsics: (3, 3)   xyz_cam: (..., 3)   returns: uv (..., 2), depth (...)
    """
    depth = xyz_cam[..., 2]
    uvw = xyz_cam @ intrinsics.T
    uv = uvw[..., :2] / depth[..., None]
    return uv, depth


def unproject(intrinsics, uv, depth):
    """Lift pixels with a depth (z in the camera frame) to camera-frame points.

    Shapes:
        intrinsics: (3, 3)   uv: (..., 2)   depth: (...)   returns: (..., 3)
    """
    fx, fy = intrinsics[0, 0], intrinsics[1, 1]
    cx, cy = intrinsics[0, 2], intrinsics[1, 2]
    x = (uv[..., 0] - cx) / fx * depth
    y = (uv[..., 1] - cy) / fy * depth
    if hasattr(depth, "new_tensor"):  # torch
        import torch

        return torch.stack([x, y, depth], dim=-1)
    import numpy as np

    return np.stack([x, y, depth], axis=-1)
