"""Occ3D-nuScenes occupancy ground truth from the synthetic world's geometry.

Layout as Occ3D-nuScenes: ``semantics``, ``mask_lidar``, ``mask_camera``, uint8 arrays of shape
(200, 200, 16) indexed [x, y, z] in the ego frame, voxels of 0.4 m over x, y in [-40, 40] m and
z in [-1, 5.4] m. Classes 0-16 as Occ3D (0 others ... 16 vegetation) and 17 free.
"""

from __future__ import annotations

import numpy as np

from bevkit.data.synth.city import K_BOX, K_CYL, K_SPHERE, City
from bevkit.data.synth.render import GROUND_OCC, Prims

OCC_RANGE = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
OCC_VOXEL = 0.4
OCC_SHAPE = (200, 200, 16)
FREE = 17
OCC_CLASSES = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade",
    "vegetation", "free",
)


_CENTRES = None


def voxel_centres_ego() -> np.ndarray:
    """Centres of all voxels in the ego frame (computed once, read-only).

    Shapes:
        returns: (200, 200, 16, 3) float32
    """
    global _CENTRES
    if _CENTRES is None:
        axes = [OCC_RANGE[i] + (np.arange(OCC_SHAPE[i]) + 0.5) * OCC_VOXEL for i in range(3)]
        _CENTRES = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
        _CENTRES.flags.writeable = False
    return _CENTRES


def semantics(city: City, prims: Prims, city_from_ego: np.ndarray) -> np.ndarray:
    """Occupancy classes per voxel: ground surface from the ground raster, objects from primitives.

    A voxel is occupied by a primitive when its centre lies within half a voxel of it.

    Shapes:
        returns: (200, 200, 16) uint8
    """
    sem = np.full(OCC_SHAPE, FREE, dtype=np.uint8)
    centres = voxel_centres_ego()
    ground_z = int(np.floor((0.0 - OCC_RANGE[2]) / OCC_VOXEL))  # the layer that holds z = 0
    xy_city = centres[:, :, ground_z, :] @ city_from_ego[:3, :3].T + city_from_ego[:3, 3]
    sem[:, :, ground_z] = GROUND_OCC[city.ground_at(xy_city[..., 0].ravel(), xy_city[..., 1].ravel())].reshape(
        OCC_SHAPE[:2])

    ego_from_city = np.linalg.inv(city_from_ego)
    ego_yaw = np.arctan2(city_from_ego[1, 0], city_from_ego[0, 0])
    c_ego = prims.center @ ego_from_city[:3, :3].T + ego_from_city[:3, 3]
    half = OCC_VOXEL / 2
    lo = np.array(OCC_RANGE[:3])
    # Static primitives first, agents last, so agents win where they touch the background.
    order = np.argsort(prims.owner >= 0, kind="stable")
    for k in order:
        kind = prims.kind[k]
        size = prims.size[k]
        if kind == K_BOX:
            ext = 0.5 * np.hypot(size[0], size[1]) + half
            ext = np.array([ext, ext, size[2] / 2 + half])
        elif kind == K_CYL:
            ext = np.array([size[0] + half, size[0] + half, size[2] / 2 + half])
        else:
            ext = np.full(3, size[0] + half)
        i0 = np.floor((c_ego[k] - ext - lo) / OCC_VOXEL).astype(int)
        i1 = np.ceil((c_ego[k] + ext - lo) / OCC_VOXEL).astype(int)
        i0 = np.clip(i0, 0, OCC_SHAPE)
        i1 = np.clip(i1, 0, OCC_SHAPE)
        if np.any(i1 <= i0):
            continue
        block = centres[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]] - c_ego[k]
        if kind == K_BOX:
            yaw = prims.yaw[k] - ego_yaw
            cy, sy = np.cos(yaw), np.sin(yaw)
            lx = cy * block[..., 0] + sy * block[..., 1]
            ly = -sy * block[..., 0] + cy * block[..., 1]
            inside = (np.abs(lx) <= size[0] / 2 + half) & (np.abs(ly) <= size[1] / 2 + half) & (
                np.abs(block[..., 2]) <= size[2] / 2 + half)
        elif kind == K_CYL:
            inside = (np.hypot(block[..., 0], block[..., 1]) <= size[0] + half) & (
                np.abs(block[..., 2]) <= size[2] / 2 + half)
        elif kind == K_SPHERE:
            inside = np.linalg.norm(block, axis=-1) <= size[0] + half
        else:
            continue
        view = sem[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]]
        view[inside] = prims.occ[k]
    return sem


class VisibilityGeometry:
    """Where each voxel centre falls in each camera and in the LiDAR's range image.

    Cameras and LiDAR are fixed on the car and the voxels are in the ego frame, so this is
    computed once per rig; the masks of a keyframe are then gathers and comparisons.
    """

    def __init__(self, cams, ego_from_cams, elevations_deg, ego_from_lidar):
        centres = voxel_centres_ego().reshape(-1, 3).astype(np.float64)
        self.cams = []
        for cam, ego_from_cam in zip(cams, ego_from_cams):
            cam_from_ego = np.linalg.inv(ego_from_cam)
            p = centres @ cam_from_ego[:3, :3].T + cam_from_ego[:3, 3]
            front = np.nonzero(p[:, 2] > 0.1)[0]
            q = p[front]
            k = cam.intrinsics
            u = np.rint(k[0, 0] * q[:, 0] / q[:, 2] + k[0, 2]).astype(np.int64)
            v = np.rint(k[1, 1] * q[:, 1] / q[:, 2] + k[1, 2]).astype(np.int64)
            ok = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
            self.cams.append((front[ok], v[ok] * cam.width + u[ok], np.linalg.norm(q[ok], axis=1)))
        lidar_from_ego = np.linalg.inv(ego_from_lidar)
        p = centres @ lidar_from_ego[:3, :3].T + lidar_from_ego[:3, 3]
        dist = np.linalg.norm(p, axis=1)
        el = np.rad2deg(np.arcsin(np.clip(p[:, 2] / np.maximum(dist, 1e-6), -1, 1)))
        self.azimuth_frac = np.arctan2(p[:, 1], p[:, 0]) % (2 * np.pi) / (2 * np.pi)
        spacing = np.abs(np.diff(elevations_deg)).mean()
        beam = np.clip(np.rint((el - elevations_deg[0]) / spacing).astype(np.int64), 0, len(elevations_deg) - 1)
        ang_size = np.rad2deg(OCC_VOXEL / 2 / np.maximum(dist, 1e-3))
        near = np.abs(el - elevations_deg[beam]) <= spacing / 2 + ang_size
        self.lidar_idx = np.nonzero(near)[0]
        self.lidar_beam = beam[near]
        self.lidar_dist = dist[near]
        self.lidar_az = self.azimuth_frac[near]

    def camera_mask(self, depth_maps) -> np.ndarray:
        """Voxels seen by at least one camera: in the image and not behind the first surface.

        ``depth_maps`` hold the distance along each pixel's unit ray to the first hit (inf: sky).

        Shapes:
            depth_maps: list of (H, W), one per camera   returns: (200, 200, 16) uint8
        """
        seen = np.zeros(int(np.prod(OCC_SHAPE)), bool)
        tol = OCC_VOXEL * np.sqrt(3) / 2
        for (idx, pix, dist), depth in zip(self.cams, depth_maps):
            seen[idx[dist <= depth.ravel()[pix] + tol]] = True
        return seen.reshape(OCC_SHAPE).astype(np.uint8)

    def lidar_mask(self, range_image: np.ndarray, max_range: float) -> np.ndarray:
        """Voxels a LiDAR beam passed through or ended in (nearest beam and azimuth step).

        Shapes:
            range_image: (beams, azimuth steps), inf where the beam returned nothing
            returns: (200, 200, 16) uint8
        """
        steps = range_image.shape[1]
        col = np.rint(self.lidar_az * steps).astype(np.int64) % steps
        reach = range_image[self.lidar_beam, col]
        reach = np.where(np.isfinite(reach), reach, max_range)
        seen = np.zeros(int(np.prod(OCC_SHAPE)), bool)
        seen[self.lidar_idx[self.lidar_dist <= reach + OCC_VOXEL * np.sqrt(3) / 2]] = True
        return seen.reshape(OCC_SHAPE).astype(np.uint8)
