"""Shared fixtures for the ops tests: the nuScenes camera rig and comparison helpers."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import torch

CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")


def _rig_text() -> str:
    try:
        return (importlib.resources.files("bevkit.data.synth") / "nuscenes_rig.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        import bevkit  # the synth package may not have an __init__ yet: read it beside bevkit

        return (Path(bevkit.__file__).parent / "data" / "synth" / "nuscenes_rig.json").read_text()


def quat_to_matrix(q) -> torch.Tensor:
    """Rotation matrix of a unit quaternion ``[w, x, y, z]``."""
    w, x, y, z = (float(v) for v in q)
    return torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ], dtype=torch.float64)


@pytest.fixture(scope="session")
def rig() -> dict:
    """Per camera: intrinsics (3, 3) at 1600x900 and ego_from_cam (4, 4), float64."""
    data = json.loads(_rig_text())
    out = {}
    for name in CAMERAS:
        sensor = data["sensors"][name]
        ego_from_cam = torch.eye(4, dtype=torch.float64)
        ego_from_cam[:3, :3] = quat_to_matrix(sensor["rotation"])
        ego_from_cam[:3, 3] = torch.tensor(sensor["translation"], dtype=torch.float64)
        out[name] = (torch.tensor(sensor["camera_intrinsic"], dtype=torch.float64), ego_from_cam)
    return out


def rig_frustum(rig: dict, cameras=CAMERAS, depth_bins: int = 12, feat_hw=(8, 22),
                image_hw=(256, 704), scale: float = 0.44, crop_top: float = 140.0) -> torch.Tensor:
    """Frustum points in the ego frame for the BEVDet image pipeline (resize, then crop the top).

    Shapes:
        returns: (N, D, H, W, 3) float64, depths 1 m .. 60 m
    """
    h, w = feat_hw
    u = torch.linspace(0, image_hw[1] - 1, w, dtype=torch.float64).view(1, 1, w).expand(depth_bins, h, w)
    v = torch.linspace(0, image_hw[0] - 1, h, dtype=torch.float64).view(1, h, 1).expand(depth_bins, h, w)
    depth = torch.linspace(1.0, 60.0, depth_bins, dtype=torch.float64).view(-1, 1, 1).expand(depth_bins, h, w)
    points = []
    for name in cameras:
        intrinsics, ego_from_cam = rig[name]
        pix = torch.stack((u / scale * depth, (v + crop_top) / scale * depth, depth), dim=-1)
        xyz_cam = pix @ torch.linalg.inv(intrinsics).T  # (D, H, W, 3)
        points.append(xyz_cam @ ego_from_cam[:3, :3].T + ego_from_cam[:3, 3])
    return torch.stack(points)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (exact when expected is all zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max() if expected.numel() else torch.tensor(0.0)
    err = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0)
    assert float(err) <= tol * float(scale), f"max error {float(err):.3g} vs scale {float(scale):.3g}"


@pytest.fixture(scope="session")
def frustum(rig):
    """``frustum(cameras=..., depth_bins=..., feat_hw=...)`` -> (N, D, H, W, 3) ego points."""
    return lambda **kw: rig_frustum(rig, **kw)


@pytest.fixture(name="assert_rel", scope="session")
def _assert_rel_fixture():
    return assert_rel


@pytest.fixture(scope="session")
def cuda_device():
    """A CUDA device for the GPU-marked tests; skips when there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
