"""A tiny hand-built batch in the data contract's layout: two cameras (front, back), boxes,
LiDAR-like points on the boxes and the ground, map and occupancy targets."""

import math

import torch

H, W = 64, 176


def rig(n: int = 2):
    """Intrinsics (N, 3, 3) and ego_from_cam (N, 4, 4): a front camera and, with n=2, a back one."""
    cam_axes = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # ego_from_cam rotation
    intr, ego_from_cam = [], []
    for k, yaw in enumerate([0.0, math.pi][:n]):
        rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1]])
        m = torch.eye(4)
        m[:3, :3] = rz @ cam_axes
        m[:3, 3] = torch.tensor([1.5 if k == 0 else -1.0, 0.0, 1.5])
        ego_from_cam.append(m)
        intr.append(torch.tensor([[80.0, 0, (W - 1) / 2], [0, 80.0, (H - 1) / 2], [0, 0, 1]]))
    return torch.stack(intr), torch.stack(ego_from_cam)


BOXES = [
    # x, y, z, l, w, h, yaw, vx, vy ; label
    [[6.0, 1.0, 0.8, 4.5, 1.9, 1.6, 0.3, 2.0, 0.0], [8.0, -2.5, 0.9, 0.7, 0.7, 1.8, 0.0, 0.5, 0.2],
     [7.0, -4.0, 0.4, 0.4, 0.4, 0.8, 0.0, math.nan, math.nan],  # unknown velocity
     [-7.0, 3.0, 0.5, 2.0, 0.5, 1.0, 1.2, 0.0, 0.0]],
    [[9.0, -1.0, 1.5, 10.0, 2.9, 3.2, -0.4, 4.0, -1.0], [5.0, 3.0, 0.6, 2.0, 0.8, 1.4, 2.0, 1.0, 1.0],
     [-8.0, -4.0, 1.6, 11.0, 2.9, 3.4, 0.1, -3.0, 0.0]],
]
LABELS = [[0, 8, 9, 5], [1, 7, 3]]  # every CenterPoint class group has an object
ATTRIBUTES = [["vehicle.moving", "pedestrian.moving", "", ""], ["vehicle.parked", "cycle.with_rider", "vehicle.moving"]]


def _points_on(boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Points inside each box and on the ground plane, as (P, 5): x y z intensity dt, ego."""
    parts = []
    for b in boxes:
        u = torch.rand(60, 3, generator=gen) - 0.5
        local = u * b[3:6]
        c, s = math.cos(b[6]), math.sin(b[6])
        xy = torch.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1]], 1) + b[:2]
        parts.append(torch.cat([xy, local[:, 2:3] + b[2]], 1))
    ground = torch.rand(300, 2, generator=gen) * 24 - 12
    parts.append(torch.cat([ground, torch.zeros(300, 1)], 1))
    xyz = torch.cat(parts)
    return torch.cat([xyz, torch.rand(len(xyz), 1, generator=gen), torch.zeros(len(xyz), 1)], 1)


def _occupancy(boxes, labels, shape_xyz, grid, zmin, dz):
    """Occ3D-layout labels (X, Y, Z): free (17) everywhere, ground (11) in the lowest slice, each box's
    class in the voxels whose centres it contains (a coarse stand-in for the real rasteriser)."""
    nx, ny, nz = shape_xyz
    (x0, _, dx), (y0, _, dy) = grid
    occ = torch.full(shape_xyz, 17, dtype=torch.uint8)
    occ[:, :, : max(1, nz // 8)] = 11  # the ground layer
    xc = x0 + (torch.arange(nx) + 0.5) * dx
    yc = y0 + (torch.arange(ny) + 0.5) * dy
    zc = zmin + (torch.arange(nz) + 0.5) * dz
    X, Y, Z = torch.meshgrid(xc, yc, zc, indexing="ij")
    for b, lb in zip(boxes, labels):
        c, s = math.cos(b[6]), math.sin(b[6])
        lx = c * (X - b[0]) + s * (Y - b[1])
        ly = -s * (X - b[0]) + c * (Y - b[1])
        inside = ((lx.abs() <= b[3] / 2 + dx / 2) & (ly.abs() <= b[4] / 2 + dy / 2)
                  & ((Z - b[2]).abs() <= b[5] / 2 + dz / 2))
        occ[inside] = lb + 1  # Occ3D ids: 1 barrier ... ; any fixed mapping serves a unit test
    return occ


def make_batch(cfg=None, n_cams: int = 2, batch: int = 2, seed: int = 0) -> dict:
    """A collated batch; map and occupancy targets follow ``cfg`` (a ModelConfig) when given."""
    gen = torch.Generator().manual_seed(seed)
    intr, e_from_c = rig(n_cams)
    out = {"images": torch.randint(0, 256, (batch, n_cams, 3, H, W), dtype=torch.uint8, generator=gen),
           "intrinsics": intr.expand(batch, -1, -1, -1).clone(),
           "img_aug": torch.eye(3).expand(batch, n_cams, 3, 3).clone(),
           "ego_from_cam": e_from_c.expand(batch, -1, -1, -1).clone(),
           "boxes": [], "labels": [], "points": [], "attributes": []}
    if batch > 1:  # the second sample was resized and cropped
        out["img_aug"][1] = torch.tensor([[0.9, 0.0, 5.0], [0.0, 0.9, 3.0], [0.0, 0.0, 1.0]])
    for i in range(batch):
        boxes = torch.tensor(BOXES[i % 2])
        out["boxes"].append(boxes)
        out["labels"].append(torch.tensor(LABELS[i % 2]))
        out["attributes"].append(list(ATTRIBUTES[i % 2]))
        out["points"].append(_points_on(boxes, gen))
    if cfg is not None and cfg.heads.map is not None:
        up = cfg.heads.map.upsample
        ny, nx = cfg.grid.shape
        k = len(cfg.heads.map.classes)
        m = torch.zeros(batch, k, ny * up, nx * up, dtype=torch.uint8)
        for i in range(batch):
            # lines two fine cells wide, like 0.6 m painted lines on a 0.4 m raster
            m[i, 0, ny * up // 2 + i: ny * up // 2 + i + 2, :] = 1  # a divider along x
            m[i, 1, :, nx * up // 3 + 2 * i: nx * up // 3 + 2 * i + 4] = 1  # a crossing across it
            m[i, 2, 2 + i: 4 + i, :] = 1  # road boundaries
            m[i, 2, -4:-2, :] = 1
            m[i, 3, 2 + i: -2, :] = 1  # drivable between them
        out["map"] = m
    if cfg is not None and cfg.map_prior is not None:
        # What a global map memory returns after earlier traversals: features on part of the grid
        # (the rest never observed, zero).
        ny, nx = cfg.grid.shape
        c = cfg.fuser.channels if cfg.fuser else (cfg.view_transform or cfg.lidar).channels
        prior = torch.randn(batch, c, ny, nx, generator=gen)
        prior[:, :, :, nx // 2:] = 0
        out["map_prior"] = prior
    if cfg is not None and cfg.heads.occupancy is not None:
        # Labels 4x finer than the prediction along each axis (Occ3D's 200 x 200 x 16 for a 50 x 50 x 4 model).
        f = 4
        ny, nx = cfg.grid.shape
        nz = cfg.heads.occupancy.nz
        (x0, x1, dx), (y0, y1, dy), (zmin, zmax, _) = cfg.grid.xbound, cfg.grid.ybound, cfg.grid.zbound
        occ = [_occupancy(BOXES[i % 2], LABELS[i % 2], (nx * f, ny * f, nz * f), ((x0, x1, dx / f), (y0, y1, dy / f)),
                          zmin, (zmax - zmin) / (nz * f)) for i in range(batch)]
        out["occupancy"] = torch.stack(occ)
        mask = torch.ones(batch, nx * f, ny * f, nz * f, dtype=torch.uint8)
        mask[:, :, :, -1] = 0  # the top slice is unobserved
        out["mask_camera"] = mask
    return out
