"""Frames, rigid transforms and camera projection: the one place that defines the conventions."""

from bevkit.geometry.transforms import (
    apply,
    inverse,
    make_transform,
    matrix_to_quat,
    quat_to_matrix,
    quat_to_yaw,
    yaw_to_quat,
    yaw_to_matrix,
)
from bevkit.geometry.camera import project, unproject

__all__ = [
    "apply",
    "inverse",
    "make_transform",
    "matrix_to_quat",
    "quat_to_matrix",
    "quat_to_yaw",
    "yaw_to_quat",
    "yaw_to_matrix",
    "project",
    "unproject",
]
