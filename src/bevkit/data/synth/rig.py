"""The nuScenes sensor rig (six cameras and LIDAR_TOP) at a chosen image scale."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from bevkit.data.nuscenes import CAMERAS
from bevkit.geometry import make_transform

LIDAR = "LIDAR_TOP"


@dataclass(frozen=True)
class CameraSpec:
    """One camera: intrinsics for the scaled image, its pose on the car, and the raw calibration."""

    channel: str
    width: int
    height: int
    intrinsics: np.ndarray  # (3, 3) at the scaled resolution, pixel centres at integers
    ego_from_cam: np.ndarray  # (4, 4)
    translation: tuple
    rotation: tuple  # [w, x, y, z]


@dataclass(frozen=True)
class LidarSpec:
    """A spinning LiDAR: beam elevations, azimuth steps and its pose on the car."""

    ego_from_lidar: np.ndarray  # (4, 4)
    translation: tuple
    rotation: tuple
    elevations_deg: np.ndarray  # (beams,), ring index = position in this array
    azimuth_steps: int
    max_range: float = 100.0


@dataclass(frozen=True)
class Rig:
    """The six nuScenes cameras and LIDAR_TOP."""

    cameras: tuple
    lidar: LidarSpec
    scale: float

    def camera(self, channel: str) -> CameraSpec:
        for cam in self.cameras:
            if cam.channel == channel:
                return cam
        raise KeyError(channel)


def load_rig(scale: float = 0.5, azimuth_steps: int = 1084) -> Rig:
    """The nuScenes rig with camera images at ``scale`` times 1600x900.

    Intrinsics are scaled so that pixel centres stay at integer coordinates for the scaled image;
    the stored intrinsics are exactly the ones the renderer uses.
    """
    if not 0.05 <= scale <= 1.0:
        raise ValueError(f"image scale must be in [0.05, 1.0], got {scale}")
    raw = json.loads(resources.files("bevkit.data.synth").joinpath("nuscenes_rig.json").read_text())
    full_w, full_h = raw["image_size"]
    width, height = int(round(full_w * scale)), int(round(full_h * scale))
    sx, sy = width / full_w, height / full_h
    cams = []
    for channel in CAMERAS:
        s = raw["sensors"][channel]
        k = np.array(s["camera_intrinsic"], dtype=np.float64)
        k_scaled = k.copy()
        k_scaled[0, 0] *= sx
        k_scaled[1, 1] *= sy
        k_scaled[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k_scaled[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        cams.append(
            CameraSpec(
                channel=channel,
                width=width,
                height=height,
                intrinsics=k_scaled,
                ego_from_cam=make_transform(s["rotation"], s["translation"]),
                translation=tuple(s["translation"]),
                rotation=tuple(s["rotation"]),
            )
        )
    lid = raw["sensors"][LIDAR]
    lo, hi = raw["lidar"]["vertical_fov_deg"]
    lidar = LidarSpec(
        ego_from_lidar=make_transform(lid["rotation"], lid["translation"]),
        translation=tuple(lid["translation"]),
        rotation=tuple(lid["rotation"]),
        elevations_deg=np.linspace(lo, hi, raw["lidar"]["beams"]),
        azimuth_steps=azimuth_steps,
    )
    return Rig(cameras=tuple(cams), lidar=lidar, scale=scale)
