"""Augmentation as matrices: ``img_aug`` (3x3, per camera) and ``bev_aug`` (4x4), so geometry stays exact.

An image augmentation maps original pixels to augmented pixels: ``uv_aug = img_aug @ K @ xyz_cam / z``.
A BEV augmentation maps the ego frame to an augmented ego frame: ``xyz_aug = bev_aug @ xyz_ego``;
boxes, points, map and occupancy targets are all transformed with the same matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageAugConfig:
    """Resize, crop, flip and rotate of camera images (BEVDet's scheme).

    ``final_size`` is (H, W) of the network input; ``resize`` is the scale range around the scale
    that fits the image width to ``final_size``; ``bottom_crop`` keeps the lower part (the road).
    """

    final_size: tuple = (256, 704)
    resize: tuple = (-0.06, 0.11)
    rotate: tuple = (-5.4, 5.4)
    flip: bool = True
    crop_h: tuple = (0.0, 0.0)


@dataclass(frozen=True)
class BEVAugConfig:
    """Rotation (degrees), scale and flips of the ego frame."""

    rotate: tuple = (-22.5, 22.5)
    scale: tuple = (0.95, 1.05)
    flip_x: float = 0.5
    flip_y: float = 0.5


def image_aug_matrix(src_size, cfg: ImageAugConfig, rng: np.random.Generator | None) -> np.ndarray:
    """The 3x3 ``img_aug`` for one image of ``src_size`` (H, W); deterministic (centre crop, no
    flip, no rotation) when ``rng`` is None.

    Pixel centres sit at integer coordinates in both images.
    """
    h, w = src_size
    fh, fw = cfg.final_size
    base = fw / w
    if rng is None:
        scale, rot, flip = base, 0.0, False
        crop_frac = float(np.mean(cfg.crop_h))
    else:
        scale = base * (1 + rng.uniform(*cfg.resize))
        rot = np.deg2rad(rng.uniform(*cfg.rotate))
        flip = bool(cfg.flip and rng.random() < 0.5)
        crop_frac = rng.uniform(*cfg.crop_h)
    new_w, new_h = w * scale, h * scale
    crop_y = int((1 - crop_frac) * new_h) - fh  # keep the bottom: the road
    crop_x = int(max(0, (new_w - fw) / 2)) if rng is None else int(rng.uniform(0, max(0, new_w - fw)))
    # pixel centres: x_new + 0.5 = (x + 0.5) * scale  ->  x_new = scale * x + (scale - 1) / 2
    m = np.array([[scale, 0, (scale - 1) / 2], [0, scale, (scale - 1) / 2], [0, 0, 1]])
    m = np.array([[1, 0, -crop_x], [0, 1, -crop_y], [0, 0, 1]]) @ m
    if flip:
        m = np.array([[-1, 0, fw - 1], [0, 1, 0], [0, 0, 1]]) @ m
    if rot:
        cx, cy = (fw - 1) / 2, (fh - 1) / 2
        c, s = np.cos(rot), np.sin(rot)
        r = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]])
        m = r @ m
    return m


def warp_image(img: torch.Tensor, img_aug: np.ndarray, size) -> torch.Tensor:
    """Apply an ``img_aug`` to an image: bilinear, zeros outside, low-pass filtered when it shrinks.

    A shrink by ``s`` < 0.9 (the linear part's scale) first resizes the whole image by about ``s``
    with an antialiasing filter (as PIL's resize, which BEVDet uses, filters), then warps that with
    the rest of the matrix; without it, point sampling at 0.44 aliases fine texture. Pixel centres
    stay exact either way (the resize's own half-pixel mapping is composed into the warp).

    Shapes:
        img: (3, H, W) uint8   img_aug: (3, 3)   size: (H', W')   returns: (3, H', W') uint8
    """
    h_out, w_out = size
    h_in, w_in = img.shape[-2:]
    src_img = img[None]
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(img_aug, dtype=np.float64)[:2, :2]))))
    if scale < 0.9:
        h_small, w_small = max(1, round(h_in * scale)), max(1, round(w_in * scale))
        # On uint8, torch's resize takes its vectorised path (3 ms for 1600 x 900, a third of float's).
        src_img = F.interpolate(src_img.contiguous(), size=(h_small, w_small), mode="bilinear", antialias=True,
                                align_corners=False)
        sx, sy = w_small / w_in, h_small / h_in  # original pixel u -> small pixel sx * u + (sx - 1) / 2
        small_from_orig = np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])
        img_aug = np.asarray(img_aug, dtype=np.float64) @ np.linalg.inv(small_from_orig)
        h_in, w_in = h_small, w_small
    inv = np.linalg.inv(img_aug)
    ys, xs = np.meshgrid(np.arange(h_out, dtype=np.float64), np.arange(w_out, dtype=np.float64), indexing="ij")
    src = np.stack([xs, ys, np.ones_like(xs)], -1) @ inv.T
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx = 2 * src[..., 0] / max(w_in - 1, 1) - 1
    gy = 2 * src[..., 1] / max(h_in - 1, 1) - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1)).float()[None]
    out = F.grid_sample(src_img.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def bev_aug_matrix(cfg: BEVAugConfig, rng: np.random.Generator | None) -> np.ndarray:
    """A 4x4 ``bev_aug`` (identity when ``rng`` is None): rotate about z, scale, flip."""
    if rng is None:
        return np.eye(4)
    rot = np.deg2rad(rng.uniform(*cfg.rotate))
    s = rng.uniform(*cfg.scale)
    c, sn = np.cos(rot), np.sin(rot)
    m = np.diag([s, s, s, 1.0])
    m[:2, :2] = s * np.array([[c, -sn], [sn, c]])
    flip = np.eye(4)
    if rng.random() < cfg.flip_x:
        flip[0, 0] = -1.0  # mirror forward/backward
    if rng.random() < cfg.flip_y:
        flip[1, 1] = -1.0  # mirror left/right
    return flip @ m


def transform_boxes(boxes: np.ndarray, bev_aug: np.ndarray) -> np.ndarray:
    """Boxes (x, y, z, l, w, h, yaw, vx, vy) under a ``bev_aug`` (rotation, uniform scale, flips).

    Shapes:
        boxes: (M, 9)   bev_aug: (4, 4)   returns: (M, 9)
    """
    out = boxes.copy()
    a = bev_aug[:3, :3]
    scale = np.cbrt(abs(np.linalg.det(a)))
    out[:, :3] = boxes[:, :3] @ a.T + bev_aug[:3, 3]
    out[:, 3:6] = boxes[:, 3:6] * scale
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], 1) @ a[:2, :2].T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 7:9] = boxes[:, 7:9] @ a[:2, :2].T
    return out


def occupancy_source_index(bev_aug: np.ndarray, shape=(200, 200, 16), voxel=0.4, lo=(-40.0, -40.0, -1.0)):
    """For each voxel of the augmented grid, the flat index of its nearest source voxel (-1 outside).

    Shapes:
        returns: (X * Y * Z,) int64
    """
    nx, ny, nz = shape
    axes = [lo[i] + (np.arange(n) + 0.5) * voxel for i, n in enumerate(shape)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inv = np.linalg.inv(bev_aug)
    src = centres @ inv[:3, :3].T + inv[:3, 3]
    idx = np.floor((src - np.asarray(lo)) / voxel).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
    flat = np.full(len(centres), -1, np.int64)
    flat[ok] = np.ravel_multi_index(tuple(idx[ok].T), shape)
    return flat


def transform_occupancy(labels: np.ndarray, source: np.ndarray | None, fill: int) -> np.ndarray:
    """Resample an Occ3D-layout (X, Y, Z) array with ``occupancy_source_index`` (None: unchanged).

    Shapes:
        labels: (X, Y, Z)   source: (X * Y * Z,)   returns: (X, Y, Z), ``fill`` where outside
    """
    if source is None:
        return labels
    out = np.where(source >= 0, labels.ravel()[np.maximum(source, 0)], fill).astype(labels.dtype)
    return out.reshape(labels.shape)
