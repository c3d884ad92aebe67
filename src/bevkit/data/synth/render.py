"""Ray casting of the synthetic world: camera images (with depth and instance ids) and LiDAR sweeps.

The world is a ground plane (z = 0, coloured by the city's ground raster) plus primitives:
oriented boxes, vertical cylinders and spheres. Every camera pixel and every LiDAR beam is a ray;
each ray takes the nearest hit, so occlusion between objects, buildings and the ground is exact.
Rays are grouped in tiles and each primitive is tested only against the tiles its bounding sphere
can touch, which keeps a frame to a few tens of milliseconds per camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevkit.data.synth.agents import CATEGORIES, Agent, Scenario
from bevkit.data.synth.city import (
    G_CROSSWALK,
    G_GRASS,
    G_ROAD,
    G_SIDEWALK,
    G_WHITE,
    G_YELLOW,
    K_BOX,
    K_CYL,
    K_SPHERE,
    M_BUILDING,
    M_FOLIAGE,
    M_POLE,
    M_TRUNK,
    City,
)

# Materials beyond the static ones in city.py.
M_PAINT, M_GLASS, M_TIRE, M_SKIN, M_CLOTH, M_CONE, M_BARRIER, M_METAL, M_LIGHT = 4, 5, 6, 7, 8, 9, 10, 11, 12
# LiDAR reflectivity per material (0..1), scaled to nuScenes-like intensities.
REFLECTIVITY = np.array([0.25, 0.2, 0.15, 0.35, 0.3, 0.08, 0.05, 0.2, 0.18, 0.85, 0.8, 0.45, 0.9])
# Occ3D class of static materials (agents take their category's class).
STATIC_OCC = {M_BUILDING: 15, M_TRUNK: 16, M_FOLIAGE: 16, M_POLE: 15}
# Ground codes -> (colour, LiDAR reflectivity, Occ3D class).
GROUND = {
    G_GRASS: ((0.26, 0.42, 0.17), 0.12, 14),
    G_ROAD: ((0.30, 0.30, 0.32), 0.06, 11),
    G_WHITE: ((0.88, 0.88, 0.86), 0.55, 11),
    G_YELLOW: ((0.85, 0.68, 0.12), 0.5, 11),
    G_SIDEWALK: ((0.62, 0.60, 0.57), 0.18, 13),
    G_CROSSWALK: ((0.90, 0.90, 0.88), 0.55, 11),
}
GROUND_COLOUR = np.zeros((256, 3))
GROUND_REFL = np.zeros(256)
GROUND_OCC = np.zeros(256, np.uint8)
for _code, (_c, _r, _o) in GROUND.items():
    GROUND_COLOUR[_code], GROUND_REFL[_code], GROUND_OCC[_code] = _c, _r, _o


@dataclass
class Prims:
    """Primitives in the city frame, flat arrays of length K.

    ``size`` is (l, w, h) for a box (l along ``yaw``), (r, r, h) for a cylinder and (r, r, r) for a
    sphere; ``center`` is the geometric centre. ``owner`` is the agent id or -1 for static ones.
    """

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    color: np.ndarray
    material: np.ndarray
    owner: np.ndarray
    occ: np.ndarray

    def __len__(self):
        return len(self.kind)

    def bounding_radius(self) -> np.ndarray:
        r = np.where(self.kind == K_BOX, 0.5 * np.linalg.norm(self.size, axis=1), 0.0)
        r = np.where(self.kind == K_CYL, np.hypot(self.size[:, 0], self.size[:, 2] / 2), r)
        return np.where(self.kind == K_SPHERE, self.size[:, 0], r)


# ---------------------------------------------------------------------------------- agent looks
def agent_parts(agent: Agent):
    """The primitives of an agent in its own frame (x forward, y left, z up from the ground).

    Returns a list of (kind, centre (3,), size (3,), colour (3,), material); all inside the box.
    """
    l, w, h = agent.size
    c = agent.color
    cat = agent.category
    dark = np.array([0.05, 0.05, 0.06])
    glass = np.array([0.10, 0.13, 0.17])
    out = []

    def box(x, y, z0, ll, ww, hh, col, mat):
        out.append((K_BOX, np.array([x, y, z0 + hh / 2]), np.array([ll, ww, hh]), np.asarray(col, float), mat))

    def cyl(x, y, z0, r, hh, col, mat):
        out.append((K_CYL, np.array([x, y, z0 + hh / 2]), np.array([r, r, hh]), np.asarray(col, float), mat))

    def sph(x, y, z, r, col, mat):
        out.append((K_SPHERE, np.array([x, y, z]), np.array([r, r, r]), np.asarray(col, float), mat))

    def wheels(xs, ww, hh):
        for x in xs:
            box(x, 0.0, 0.0, hh * 1.1, ww, hh, dark, M_TIRE)

    if cat in ("vehicle.car", "vehicle.emergency.police"):
        wheels((l * 0.32, -l * 0.32), w * 0.98, h * 0.36)
        box(0.0, 0.0, h * 0.2, l, w, h * 0.38, c, M_PAINT)
        box(-l * 0.06, 0.0, h * 0.58, l * 0.52, w * 0.86, h * 0.42, glass, M_GLASS)
        box(-l * 0.06, 0.0, h * 0.93, l * 0.46, w * 0.8, h * 0.07, c, M_PAINT)
        if cat == "vehicle.emergency.police":
            box(-l * 0.06, 0.0, h * 0.99 - 0.06, 0.25, w * 0.6, 0.06, (0.1, 0.2, 0.95), M_LIGHT)
    elif cat == "vehicle.truck":
        wheels((l * 0.36, -l * 0.1, -l * 0.36), w * 0.98, h * 0.3)
        box(l * 0.38, 0.0, h * 0.18, l * 0.24, w, h * 0.45, (0.2, 0.2, 0.22), M_PAINT)
        box(l * 0.38, 0.0, h * 0.63, l * 0.24, w * 0.95, h * 0.3, glass, M_GLASS)
        box(-l * 0.12, 0.0, h * 0.22, l * 0.76, w, h * 0.78, c, M_PAINT)
    elif cat.startswith("vehicle.bus"):
        wheels((l * 0.35, -l * 0.3), w * 0.98, h * 0.25)
        box(0.0, 0.0, h * 0.12, l, w, h * 0.4, c, M_PAINT)
        box(0.0, 0.0, h * 0.52, l * 0.98, w * 0.96, h * 0.33, glass, M_GLASS)
        box(0.0, 0.0, h * 0.85, l, w, h * 0.15, c, M_PAINT)
    elif cat == "vehicle.trailer":
        wheels((-l * 0.3, -l * 0.38), w * 0.95, h * 0.26)
        box(l * 0.4, 0.0, 0.0, 0.3, 0.3, h * 0.3, dark, M_METAL)
        box(0.0, 0.0, h * 0.28, l, w, h * 0.72, c, M_PAINT)
    elif cat == "vehicle.construction":
        wheels((l * 0.3, -l * 0.3), w, h * 0.4)
        box(-l * 0.1, 0.0, h * 0.3, l * 0.6, w, h * 0.3, c, M_PAINT)
        box(-l * 0.15, 0.0, h * 0.6, l * 0.3, w * 0.7, h * 0.4, glass, M_GLASS)
        box(l * 0.3, 0.0, h * 0.45, l * 0.4, w * 0.25, h * 0.18, c * 0.9, M_PAINT)
        box(l * 0.45, 0.0, h * 0.1, l * 0.1, w, h * 0.3, (0.3, 0.3, 0.3), M_METAL)
    elif cat in ("vehicle.bicycle", "vehicle.motorcycle"):
        wr = 0.33 if cat == "vehicle.bicycle" else 0.3
        for x in (l / 2 - wr, -l / 2 + wr):
            box(x, 0.0, 0.0, 2 * wr, 0.07, 2 * wr, dark, M_TIRE)
        body_h = 0.35 if cat == "vehicle.bicycle" else 0.45
        box(0.0, 0.0, wr, l - 2 * wr, min(w, 0.12 if cat == "vehicle.bicycle" else 0.45), body_h, c, M_METAL)
        if agent.rider:
            top = h
            cyl(0.0, 0.0, top * 0.45, min(w, 0.5) * 0.42, top * 0.33, np.clip(c[::-1] + 0.3, 0, 1), M_CLOTH)
            sph(0.0, 0.0, top - 0.12, 0.12, (0.3, 0.3, 0.32), M_CLOTH)
    elif cat.startswith("human.pedestrian"):
        r = min(l, w) / 2
        if agent.posture == "sitting":
            box(0.0, 0.0, 0.0, l, w, h * 0.45, (0.35, 0.25, 0.18), M_METAL)
            cyl(0.0, 0.0, h * 0.45, r * 0.6, h * 0.4, c, M_CLOTH)
            sph(0.0, 0.0, h - r * 0.35, r * 0.35, (0.80, 0.62, 0.50), M_SKIN)
        else:
            cyl(0.0, 0.0, 0.0, r * 0.55, h * 0.47, (0.15, 0.15, 0.25), M_CLOTH)
            cyl(0.0, 0.0, h * 0.47, r * 0.7, h * 0.36, c, M_CLOTH)
            sph(0.0, 0.0, h - 0.12, min(0.12, r * 0.5), (0.80, 0.62, 0.50) * np.array([1, 1, 1]), M_SKIN)
    elif cat == "movable_object.trafficcone":
        r = l / 2
        box(0.0, 0.0, 0.0, l, w, 0.04, (0.1, 0.1, 0.1), M_TIRE)
        cyl(0.0, 0.0, 0.04, r * 0.75, h * 0.35, (1.0, 0.4, 0.05), M_CONE)
        cyl(0.0, 0.0, 0.04 + h * 0.35, r * 0.55, h * 0.2, (0.97, 0.97, 0.97), M_CONE)
        cyl(0.0, 0.0, 0.04 + h * 0.55, r * 0.38, h * 0.41 - 0.04, (1.0, 0.4, 0.05), M_CONE)
    elif cat == "movable_object.barrier":
        for y in (-w * 0.4, w * 0.4):
            box(0.0, y, 0.0, l, 0.1, h * 0.45, (0.6, 0.6, 0.6), M_METAL)
        box(0.0, 0.0, h * 0.4, l * 0.4, w, h * 0.6, (0.9, 0.1, 0.1), M_BARRIER)
    elif cat == "static_object.bicycle_rack":
        for y in np.linspace(-w * 0.45, w * 0.45, 2):
            box(0.0, y, 0.0, l, 0.05, 0.6, (0.55, 0.57, 0.6), M_METAL)
    else:
        box(0.0, 0.0, 0.0, l, w, h, c, M_PAINT)
    return out


def scene_prims(scn: Scenario, k: int, centre_xy, radius: float, parts_cache: dict) -> Prims:
    """Every primitive within ``radius`` of a point at simulation step ``k`` (city frame)."""
    st = scn.city.static
    dist = np.hypot(st.center[:, 0] - centre_xy[0], st.center[:, 1] - centre_xy[1])
    # Buildings are seen from far; trees and posts only nearer (beyond, they are a few pixels).
    keep = np.where(st.material == M_BUILDING, dist - 0.5 * np.hypot(st.size[:, 0], st.size[:, 1]) < radius,
                    dist < min(radius, 90.0))
    kind = [st.kind[keep]]
    center = [st.center[keep]]
    size = [st.size[keep]]
    yaw = [st.yaw[keep]]
    color = [st.color[keep]]
    material = [st.material[keep]]
    owner = [np.full(keep.sum(), -1)]
    occ = [np.array([STATIC_OCC[int(m)] for m in st.material[keep]], np.uint8)]
    for a in scn.agents:
        if np.hypot(a.x[k] - centre_xy[0], a.y[k] - centre_xy[1]) > radius:
            continue
        parts = parts_cache.get(a.id)
        if parts is None:
            parts = agent_parts(a)
            parts_cache[a.id] = parts
        c, s = np.cos(a.yaw[k]), np.sin(a.yaw[k])
        for pk, pc, ps, pcol, pm in parts:
            kind.append(np.array([pk], np.int8))
            center.append(np.array([[a.x[k] + c * pc[0] - s * pc[1], a.y[k] + s * pc[0] + c * pc[1], pc[2]]]))
            size.append(ps[None])
            yaw.append(np.array([a.yaw[k]]))
            color.append(pcol[None])
            material.append(np.array([pm], np.int16))
            owner.append(np.array([a.id]))
            occ.append(np.array([CATEGORIES[a.category][3]], np.uint8))
    return Prims(
        kind=np.concatenate(kind),
        center=np.concatenate(center),
        size=np.concatenate(size),
        yaw=np.concatenate(yaw),
        color=np.concatenate(color),
        material=np.concatenate(material),
        owner=np.concatenate(owner),
        occ=np.concatenate(occ),
    )


# ----------------------------------------------------------------------------------- ray sets
@dataclass
class RaySet:
    """Unit ray directions in a sensor frame, grouped in tiles for culling.

    Shapes:
        dirs: (R, 3)   tile_dir: (T, 3)   tile_cos: (T,) cosine of each tile's half-angle
    """

    dirs: np.ndarray
    tile_dir: np.ndarray
    tile_half: np.ndarray
    tile_rays: list


def _tiles(dirs_grid: np.ndarray, tile: tuple[int, int]) -> RaySet:
    rows, cols = dirs_grid.shape[:2]
    flat = dirs_grid.reshape(-1, 3)
    index = np.arange(rows * cols).reshape(rows, cols)
    tdir, thalf, trays = [], [], []
    for r0 in range(0, rows, tile[0]):
        for c0 in range(0, cols, tile[1]):
            idx = index[r0 : r0 + tile[0], c0 : c0 + tile[1]].ravel()
            d = flat[idx]
            m = d.mean(axis=0)
            m /= np.linalg.norm(m)
            tdir.append(m)
            thalf.append(np.arccos(np.clip(d @ m, -1, 1)).max())
            trays.append(idx)
    return RaySet(flat, np.array(tdir), np.array(thalf), trays)


def camera_rays(intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """Unit directions through every pixel centre, in the camera frame (row-major).

    Shapes:
        returns: (H*W, 3)
    """
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    d = np.stack([(u - intrinsics[0, 2]) / intrinsics[0, 0], (v - intrinsics[1, 2]) / intrinsics[1, 1],
                  np.ones_like(u)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return d.reshape(-1, 3)


def lidar_rays(elevations_deg: np.ndarray, azimuth_steps: int) -> RaySet:
    """Unit directions of a spinning LiDAR in its own frame: (beams x azimuth steps), ring-major."""
    el = np.deg2rad(elevations_deg)[:, None]
    az = (np.arange(azimuth_steps) / azimuth_steps * 2 * np.pi)[None, :]
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el) * np.ones_like(az)], axis=-1)
    return _tiles(d, (4, 16))


# ------------------------------------------------------------------------------- intersection
def _hit(kind, center, size, yaw, o, d):
    """Distance along each ray to one primitive (inf where missed).

    Shapes:
        o: (3,)   d: (R, 3)   returns: (R,)
    """
    oc = o - center
    if kind == K_BOX:
        c, s = np.cos(yaw), np.sin(yaw)
        ol = np.array([c * oc[0] + s * oc[1], -s * oc[0] + c * oc[1], oc[2]])
        dl = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
        half = size / 2
        tmin = np.full(len(d), -np.inf)
        tmax = np.full(len(d), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for ax in range(3):
                inv = 1.0 / dl[:, ax]
                t1 = (-half[ax] - ol[ax]) * inv
                t2 = (half[ax] - ol[ax]) * inv
                # fmin/fmax ignore the NaN of a ray parallel to and on a slab's face.
                tmin = np.fmax(tmin, np.fmin(t1, t2))
                tmax = np.fmin(tmax, np.fmax(t1, t2))
        ok = (tmax >= tmin) & (tmax > 0)
        return np.where(ok, np.where(tmin > 0, tmin, tmax), np.inf)
    if kind == K_SPHERE:
        r = size[0]
        b = d @ oc
        c = oc @ oc - r * r
        disc = b * b - c
        sq = np.sqrt(np.maximum(disc, 0))
        t = -b - sq
        t = np.where(t > 0, t, -b + sq)
        return np.where((disc >= 0) & (t > 0), t, np.inf)
    # Vertical cylinder with caps.
    r, hh = size[0], size[2] / 2
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = oc[0] * d[:, 0] + oc[1] * d[:, 1]
    c = oc[0] ** 2 + oc[1] ** 2 - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
    z = oc[2] + ts * d[:, 2]
    side = np.where((disc >= 0) & (a > 1e-12) & (ts > 0) & (np.abs(z) <= hh), ts, np.inf)
    best = side
    for zc in (-hh, hh):
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (zc - oc[2]) / d[:, 2]
        px = oc[0] + tc * d[:, 0]
        py = oc[1] + tc * d[:, 1]
        best = np.minimum(best, np.where((tc > 0) & (px * px + py * py <= r * r), tc, np.inf))
    return best


def _normals(prims: Prims, idx: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Surface normals at hit points ``p`` on primitives ``idx``.

    Shapes:
        idx: (R,)   p: (R, 3)   returns: (R, 3)
    """
    n = np.zeros_like(p)
    kind = prims.kind[idx]
    oc = p - prims.center[idx]
    yaw = prims.yaw[idx]
    size = prims.size[idx]
    m = kind == K_SPHERE
    n[m] = oc[m] / np.maximum(np.linalg.norm(oc[m], axis=1, keepdims=True), 1e-9)
    m = kind == K_CYL
    if m.any():
        hh = size[m, 2] / 2
        cap = np.abs(np.abs(oc[m, 2]) - hh) < 1e-4 * np.maximum(1, hh) + 1e-6
        radial = np.concatenate([oc[m, :2], np.zeros((m.sum(), 1))], axis=1)
        radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-9)
        capn = np.zeros_like(radial)
        capn[:, 2] = np.sign(oc[m, 2])
        n[m] = np.where(cap[:, None], capn, radial)
    m = kind == K_BOX
    if m.any():
        c, s = np.cos(yaw[m]), np.sin(yaw[m])
        lx = c * oc[m, 0] + s * oc[m, 1]
        ly = -s * oc[m, 0] + c * oc[m, 1]
        lz = oc[m, 2]
        rel = np.abs(np.stack([lx, ly, lz], 1)) / np.maximum(size[m] / 2, 1e-6)
        axis = np.argmax(rel, axis=1)
        sign = np.sign(np.stack([lx, ly, lz], 1)[np.arange(m.sum()), axis])
        nl = np.zeros((m.sum(), 3))
        nl[np.arange(m.sum()), axis] = sign
        n[m] = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], 1)
    return n


@dataclass
class Hits:
    """Nearest hit per ray. ``prim`` is -1 for the ground (when ``t`` is finite) or for nothing."""

    t: np.ndarray  # (R,) distance along the unit ray, inf for none
    prim: np.ndarray  # (R,)
    unoccluded: dict  # agent id -> number of rays that would hit it with nothing in front


def _union_sizes(index_lists: dict, n: int) -> dict:
    """For each key, how many distinct indices (< n) its arrays hold together, without sorting."""
    seen = np.zeros(n, bool)
    out = {}
    for key, arrays in index_lists.items():
        for a in arrays:
            seen[a] = True
        out[key] = int(np.count_nonzero(seen))
        for a in arrays:
            seen[a] = False
    return out


def cast(prims: Prims, origin: np.ndarray, rays: RaySet, world_from_sensor_rot: np.ndarray,
         max_range: float = np.inf) -> tuple[Hits, np.ndarray]:
    """Cast every ray of a sensor from ``origin`` (city frame).

    Returns the hits and the ray directions in the city frame (R, 3).
    """
    dirs = rays.dirs @ world_from_sensor_rot.T
    tile_dir = rays.tile_dir @ world_from_sensor_rot.T
    n_rays = len(dirs)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < -1e-9, -origin[2] / dirs[:, 2], np.inf)
    best = np.minimum(t_ground, max_range)
    best[t_ground > max_range] = np.inf
    prim = np.full(n_rays, -1, np.int64)
    if len(prims):
        oc = prims.center - origin
        dist = np.linalg.norm(oc, axis=1)
        rad = prims.bounding_radius()
        with np.errstate(invalid="ignore", divide="ignore"):
            ang = np.where(dist > rad, np.arcsin(np.clip(rad / np.maximum(dist, 1e-9), 0, 1)), np.pi)
            cosang = (oc / np.maximum(dist, 1e-9)[:, None]) @ tile_dir.T  # (K, T)
        touch = np.arccos(np.clip(cosang, -1, 1)) <= ang[:, None] + rays.tile_half[None, :] + 1e-6
        touch &= (dist - rad < max_range)[:, None]
        for k in np.nonzero(touch.any(axis=1))[0]:
            ray_idx = np.concatenate([rays.tile_rays[t] for t in np.nonzero(touch[k])[0]])
            t = _hit(prims.kind[k], prims.center[k], prims.size[k], prims.yaw[k], origin, dirs[ray_idx])
            closer = t < best[ray_idx]
            if closer.any():
                sel = ray_idx[closer]
                best[sel] = t[closer]
                prim[sel] = k
    far = best > max_range
    best[far] = np.inf
    prim[far] = -1
    return Hits(best, prim, {}), dirs


def _corners(prims: Prims) -> np.ndarray:
    """The 8 corners of each primitive's bounding box (boxes: oriented; others: axis-aligned).

    Shapes:
        returns: (K, 8, 3)
    """
    half = np.where((prims.kind == K_BOX)[:, None], prims.size / 2,
                    np.stack([prims.size[:, 0], prims.size[:, 0], np.where(prims.kind == K_CYL, prims.size[:, 2] / 2,
                                                                         prims.size[:, 0])], 1))
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    local = signs[None] * half[:, None]
    yaw = np.where(prims.kind == K_BOX, prims.yaw, 0.0)[:, None]
    c, s = np.cos(yaw), np.sin(yaw)
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, local[..., 2]], -1) + prims.center[:, None]


def cast_camera(prims: Prims, city_from_cam: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                dirs_cam: np.ndarray, count_owners: bool = False) -> tuple[Hits, np.ndarray]:
    """Cast one ray per pixel of a pinhole camera; primitives are tested only inside their
    projected bounding rectangle, nearest first, and skipped when that rectangle is already
    covered by nearer hits.

    Shapes:
        city_from_cam: (4, 4)   dirs_cam: (H*W, 3) unit rays (see ``camera_rays``)
        returns: hits over H*W rays (row-major), ray directions in the city frame (H*W, 3)
    """
    origin = city_from_cam[:3, 3]
    rot = city_from_cam[:3, :3]
    dirs = dirs_cam @ rot.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < -1e-9, -origin[2] / dirs[:, 2], np.inf)
    best = t_ground.reshape(height, width).copy()
    prim = np.full((height, width), -1, np.int64)
    dirs_grid = dirs.reshape(height, width, 3)
    unocc: dict = {}
    if len(prims):
        corners = (_corners(prims) - origin) @ rot  # (K, 8, 3) in the camera frame
        # Clip against the near plane: keep corners in front, add where corner-to-corner
        # segments cross the plane (those points lie inside the convex box, so the hull is exact).
        z_near = 0.05
        i, j = np.triu_indices(8, 1)
        za, zb = corners[:, i, 2], corners[:, j, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (z_near - za) / (zb - za)
        cross = ((za - z_near) * (zb - z_near) < 0)
        pts = corners[:, i] + f[..., None] * (corners[:, j] - corners[:, i])
        allp = np.concatenate([corners, pts], axis=1)
        valid = np.concatenate([corners[..., 2] >= z_near, cross], axis=1)
        z = np.where(valid, allp[..., 2], 1.0)
        u = intrinsics[0, 0] * allp[..., 0] / z + intrinsics[0, 2]
        v = intrinsics[1, 1] * allp[..., 1] / z + intrinsics[1, 2]
        keep = valid.any(axis=1)
        u0 = np.floor(np.where(valid, u, np.inf).min(1)).clip(0, width)
        u1 = (np.ceil(np.where(valid, u, -np.inf).max(1)) + 1).clip(0, width)
        v0 = np.floor(np.where(valid, v, np.inf).min(1)).clip(0, height)
        v1 = (np.ceil(np.where(valid, v, -np.inf).max(1)) + 1).clip(0, height)
        keep &= (u1 > u0) & (v1 > v0)
        near = np.linalg.norm(prims.center - origin, axis=1) - prims.bounding_radius()
        for k in np.nonzero(keep)[0][np.argsort(near[keep])]:
            a0, a1, b0, b1 = int(v0[k]), int(v1[k]), int(u0[k]), int(u1[k])
            best_view = best[a0:a1, b0:b1]
            if best_view.max() < near[k]:
                continue  # fully hidden behind what is already drawn
            t = _hit(prims.kind[k], prims.center[k], prims.size[k], prims.yaw[k], origin,
                     dirs_grid[a0:a1, b0:b1].reshape(-1, 3)).reshape(a1 - a0, b1 - b0)
            if count_owners and prims.owner[k] >= 0:
                rr, cc = np.nonzero(t < np.inf)
                if len(rr):
                    unocc.setdefault(int(prims.owner[k]), []).append((rr + a0) * width + cc + b0)
            closer = t < best_view
            best_view[closer] = t[closer]
            prim[a0:a1, b0:b1][closer] = k
    return Hits(best.ravel(), prim.ravel(), _union_sizes(unocc, height * width)), dirs


# ------------------------------------------------------------------------------------ shading
def _value_noise(x, y, scale):
    """A deterministic value in [0, 1) per cell of ``scale`` metres (integer hash of the cell)."""
    ix = np.floor(x * (1.0 / scale)).astype(np.int64)
    iy = np.floor(y * (1.0 / scale)).astype(np.int64)
    h = (ix * 73856093) ^ (iy * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 7) & 1023).astype(np.float32) * (1.0 / 1024.0)


HORIZON = np.array([0.80, 0.85, 0.90], np.float32)
ZENITH = np.array([0.42, 0.60, 0.86], np.float32)


def shade_camera(city: City, prims: Prims, hits: Hits, origin, dirs, sun, rng) -> np.ndarray:
    """Colour per ray in [0, 1]: sky, textured ground, or a lit primitive with its pattern.

    Shapes:
        dirs: (R, 3)   returns: (R, 3) float32
    """
    n = len(dirs)
    col = np.empty((n, 3), np.float32)
    fin = np.isfinite(hits.t)
    sky = np.nonzero(~fin)[0]
    up = np.clip(dirs[sky, 2], 0, 1).astype(np.float32)[:, None]
    col[sky] = HORIZON * (1 - up) + ZENITH * up
    ground = np.nonzero(fin & (hits.prim < 0))[0]
    obj = np.nonzero(hits.prim >= 0)[0]

    if len(ground):
        tg = hits.t[ground]
        gx = origin[0] + dirs[ground, 0] * tg
        gy = origin[1] + dirs[ground, 1] * tg
        code = city.ground_at(gx, gy)
        tex = 0.86 + 0.12 * _value_noise(gx, gy, 0.15) + 0.08 * _value_noise(gx + 0.37, gy - 0.11, 1.3)
        grass = code == G_GRASS
        tex[grass] = 0.75 + 0.35 * _value_noise(gx[grass], gy[grass], 0.3)
        walk = np.nonzero(code == G_SIDEWALK)[0]
        if len(walk):
            joint = (np.abs(gx[walk] - np.rint(gx[walk])) < 0.03) | (np.abs(gy[walk] - np.rint(gy[walk])) < 0.03)
            tex[walk[joint]] *= 0.8
        col[ground] = GROUND_COLOUR[code].astype(np.float32) * (tex * (0.55 + 0.5 * max(sun[2], 0)))[:, None]

    if len(obj):
        idx = hits.prim[obj]
        po = origin + dirs[obj] * hits.t[obj, None]
        nrm = _normals(prims, idx, po)
        base = prims.color[idx].astype(np.float32)
        mat = prims.material[idx]
        # Building facades: a grid of windows on the walls.
        b = np.nonzero((mat == M_BUILDING) & (np.abs(nrm[:, 2]) < 0.5))[0]
        if len(b):
            along = np.where(np.abs(nrm[b, 0]) > 0.5, po[b, 1], po[b, 0])
            z = po[b, 2]
            win = ((z / 3.4) % 1.0 > 0.35) & ((np.abs(along) / 2.8) % 1.0 < 0.55) & (z > 2.5)
            wb = b[win]
            base[wb] = np.array([0.16, 0.2, 0.26], np.float32) + 0.1 * _value_noise(along[win], z[win], 2.8)[:, None]
        s = np.nonzero(mat == M_BARRIER)[0]
        if len(s):
            stripe = (np.abs(po[s, 0] * 0.7 + po[s, 1] * 0.7 + po[s, 2]) / 0.5) % 1.0 < 0.5
            base[s[stripe]] = 0.95
        f = np.nonzero(mat == M_FOLIAGE)[0]
        if len(f):
            base[f] *= (0.7 + 0.5 * _value_noise(po[f, 0] + po[f, 2], po[f, 1], 0.25))[:, None]
        light = 0.45 + 0.6 * np.clip(nrm @ sun, 0, 1) + 0.1 * np.clip(nrm[:, 2], 0, 1)
        shaded = base * light.astype(np.float32)[:, None]
        g = np.nonzero(mat == M_GLASS)[0]
        if len(g):
            refl = np.clip(-(dirs[obj[g]] * nrm[g]).sum(1), 0, 1)
            shaded[g] += (0.25 * (1 - refl)).astype(np.float32)[:, None] * np.array([0.7, 0.8, 0.9], np.float32)
        col[obj] = shaded
    # Haze with distance.
    hit = np.nonzero(fin)[0]
    fog = (1 - np.exp(-hits.t[hit] / 450.0)).astype(np.float32)[:, None]
    col[hit] = col[hit] * (1 - fog) + HORIZON * fog
    col += rng.standard_normal(size=col.shape, dtype=np.float32) * 0.012
    return np.clip(col, 0, 1, out=col)


def lidar_intensity(city: City, prims: Prims, hits: Hits, origin, dirs, rng) -> np.ndarray:
    """nuScenes-like intensity (0..255) per hit from material reflectivity and incidence angle."""
    p = origin + dirs * hits.t[:, None]
    refl = np.empty(len(dirs))
    cos_inc = np.empty(len(dirs))
    ground = hits.prim < 0
    refl[ground] = GROUND_REFL[city.ground_at(p[ground, 0], p[ground, 1])]
    cos_inc[ground] = np.abs(dirs[ground, 2])
    obj = ~ground
    if obj.any():
        idx = hits.prim[obj]
        refl[obj] = REFLECTIVITY[prims.material[idx]]
        cos_inc[obj] = np.abs((_normals(prims, idx, p[obj]) * dirs[obj]).sum(1))
    val = 255 * refl * (0.35 + 0.65 * cos_inc) * rng.uniform(0.85, 1.15, size=len(dirs))
    return np.clip(np.round(val), 0, 255)


def points_in_box(xyz: np.ndarray, box_xyz, yaw: float, size) -> np.ndarray:
    """Mask of points inside an oriented box (centre, yaw, (l, w, h)); same frame for both.

    Shapes:
        xyz: (P, 3)   returns: (P,) bool
    """
    c, s = np.cos(yaw), np.sin(yaw)
    d = xyz - np.asarray(box_xyz)
    lx = c * d[:, 0] + s * d[:, 1]
    ly = -s * d[:, 0] + c * d[:, 1]
    return (np.abs(lx) <= size[0] / 2) & (np.abs(ly) <= size[1] / 2) & (np.abs(d[:, 2]) <= size[2] / 2)


__all__ = [
    "Prims", "RaySet", "Hits", "agent_parts", "scene_prims", "camera_rays", "lidar_rays", "cast",
    "shade_camera", "lidar_intensity", "points_in_box",
]
