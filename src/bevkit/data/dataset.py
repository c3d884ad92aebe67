"""Training samples: a ``Dataset`` over a nuScenes-format index, and the collate function.

A sample carries only independent quantities (DESIGN.md, "Data contract"); everything else is
derived by whoever needs it, e.g. ``lidar_from_cam = inverse(ego_from_lidar) @ ego_from_cam``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bevkit.data.augment import (
    BEVAugConfig,
    ImageAugConfig,
    bev_aug_matrix,
    image_aug_matrix,
    occupancy_source_index,
    transform_boxes,
    transform_occupancy,
    warp_image,
)
from bevkit.data.maps import MAP_CLASSES, MapLayers, rasterise
from bevkit.data.nuscenes import CAMERAS, CATEGORY_TO_CLASS, DETECTION_CLASSES, MAX_SWEEPS, DataError, NuScenesIndex
from bevkit.geometry import inverse
from bevkit.geometry.grid import BEVGrid

OCC_FREE = 17
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """What a dataset serves: cameras, input size, classes, sweeps, targets and augmentation."""

    cameras: tuple = CAMERAS
    image_size: tuple = (256, 704)
    classes: tuple = DETECTION_CLASSES
    category_map: dict = field(default_factory=lambda: dict(CATEGORY_TO_CLASS))
    sweeps: int = 0  # previous LiDAR sweeps to accumulate (0: the keyframe only), at most MAX_SWEEPS
    # Sweep points with |x| and |y| below this (metres, in the sweep's sensor frame) are dropped: returns
    # of the car itself, which ego-motion compensation would smear behind it (mmdet3d's remove_close).
    sweep_min_distance: float = 1.0
    load_points: bool = True
    map_grid: BEVGrid | None = None
    map_classes: tuple = MAP_CLASSES
    map_line_width: float = 0.6
    occupancy: bool = False
    # Leave out annotations with no LiDAR and no radar point in them (mmdet3d's use_valid_flag, which the
    # upstream BEV repos train with); the devkit's evaluation drops them from the ground truth too.
    drop_empty_boxes: bool = False
    img_aug: ImageAugConfig | None = None  # None: deterministic resize and crop
    bev_aug: BEVAugConfig | None = None  # None: identity


def read_points(path: Path) -> np.ndarray:
    """A ``.pcd.bin`` sweep: float32 x 5 (x, y, z, intensity, ring) in the sensor frame.

    Shapes:
        returns: (P, 5)
    """
    try:
        size = os.path.getsize(path)
        if size % 20:
            raise DataError(f"{path}: {size} bytes is not a whole number of 5-float points (20 bytes each)")
        return np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    except OSError as e:
        raise DataError(f"{path}: cannot read LiDAR points ({e.strerror})") from None


def read_occupancy(path: Path) -> dict:
    """An Occ3D ``labels.npz``: ``semantics``, ``mask_lidar``, ``mask_camera`` (X, Y, Z) uint8."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("semantics", "mask_lidar", "mask_camera")}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read Occ3D labels ({e})") from None


class NuScenesDataset(Dataset):
    """Samples of one split as tensors, ready for a multi-worker ``DataLoader``.

    Each item is a dict:
        token, scene, timestamp, prev, next (str / int)
        images (N, 3, H, W) uint8, intrinsics (N, 3, 3), img_aug (N, 3, 3), ego_from_cam (N, 4, 4)
        ego_from_lidar (4, 4), global_from_ego (4, 4), bev_aug (4, 4)
        points (P, 5: x y z intensity dt) in the (augmented) ego frame
        boxes (M, 9) in the (augmented) ego frame, labels (M,) int64, num_lidar_pts (M,),
        attributes (list of M str), instances (list of M str)
        map (K, Y, X) uint8 if ``map_grid``; occupancy / mask_camera / mask_lidar (X, Y, Z) if asked
    Boxes of categories outside ``category_map`` are dropped, and with ``drop_empty_boxes`` those with
    no LiDAR and no radar point; velocities unknown to the data (no neighbouring annotation) are NaN.
    """

    def __init__(self, root, split: str, cfg: DataConfig | None = None, version: str | None = None,
                 index: NuScenesIndex | None = None, seed: int = 0):
        self.cfg = cfg or DataConfig()
        if not 0 <= self.cfg.sweeps <= MAX_SWEEPS:
            raise DataError(f"sweeps: the index keeps 0 to {MAX_SWEEPS} previous sweeps per keyframe, "
                            f"got {self.cfg.sweeps}")
        self.index = index or NuScenesIndex.load(root, version)
        self.root = Path(self.index.root)
        self.samples = self.index.split(split)
        if not self.samples:
            raise DataError(f"{self.root / self.index.version}: split {split!r} has no samples")
        self.split = split
        self.seed = seed
        self.epoch = 0
        self._maps: dict = {}
        self.class_index = {c: i for i, c in enumerate(self.cfg.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are a function of (seed, epoch, index): reproducible with any workers."""
        self.epoch = epoch

    def _rng(self, i):
        if self.cfg.img_aug is None and self.cfg.bev_aug is None:
            return None
        return np.random.default_rng([self.seed, self.epoch, i])

    def position(self, token: str) -> int | None:
        """Index of a sample token in this split (None if it is not in it)."""
        if not hasattr(self, "_positions"):
            self._positions = {s["token"]: i for i, s in enumerate(self.samples)}
        return self._positions.get(token)

    def map_layers(self, location: str) -> MapLayers:
        if location not in self._maps:
            self._maps[location] = MapLayers(self.root / "maps" / "expansion" / f"{location}.json")
        return self._maps[location]

    def __getitem__(self, i: int) -> dict:
        return self.load(i)

    def load(self, i: int, aug_key: int | None = None) -> dict:
        """Sample ``i`` with the augmentations drawn for sample ``aug_key`` (default ``i``): a history
        frame loaded with its current frame's key shares its image and BEV augmentation."""
        s = self.samples[i]
        cfg = self.cfg
        rng = self._rng(i if aug_key is None else aug_key)
        bev_aug = bev_aug_matrix(cfg.bev_aug, rng) if cfg.bev_aug is not None else np.eye(4)
        images, intr, augs, e_from_c = [], [], [], []
        for ch in cfg.cameras:
            cam = s["cams"].get(ch)
            if cam is None:
                raise DataError(f"sample {s['token']}: no {ch} keyframe")
            path = self.root / cam["filename"]
            try:
                with Image.open(path) as im:
                    img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            except OSError as e:
                raise DataError(f"{path}: cannot read image of sample {s['token']} ({e})") from None
            aug = image_aug_matrix(img.shape[-2:], cfg.img_aug or ImageAugConfig(final_size=cfg.image_size),
                                   rng if cfg.img_aug is not None else None)
            images.append(warp_image(img, aug, cfg.image_size))
            intr.append(cam["intrinsics"])
            augs.append(aug)
            e_from_c.append(cam["ego_from_cam"])

        a = s["anns"]
        keep = [k for k, c in enumerate(a["category"]) if cfg.category_map.get(c) in self.class_index
                and not (cfg.drop_empty_boxes and a["num_lidar_pts"][k] + a["num_radar_pts"][k] == 0)]
        boxes = np.array([[np.nan if v is None else v for v in a["boxes"][k]] for k in keep],
                         dtype=np.float64).reshape(-1, 9)
        boxes = transform_boxes(boxes, bev_aug)
        out = {
            "token": s["token"], "scene": self.index.scenes[s["scene_token"]]["name"], "timestamp": s["timestamp"],
            "location": self.index.location(s),
            "prev": s["prev"], "next": s["next"],
            "images": torch.stack(images) if images else torch.zeros(0, 3, *cfg.image_size, dtype=torch.uint8),
            "intrinsics": torch.tensor(np.array(intr), dtype=torch.float32).reshape(-1, 3, 3),
            "img_aug": torch.tensor(np.array(augs), dtype=torch.float32).reshape(-1, 3, 3),
            "ego_from_cam": torch.tensor(np.array(e_from_c), dtype=torch.float32).reshape(-1, 4, 4),
            "ego_from_lidar": torch.tensor(s["lidar"]["ego_from_lidar"], dtype=torch.float32),
            "global_from_ego": torch.tensor(s["global_from_ego"], dtype=torch.float64),
            "bev_aug": torch.tensor(bev_aug, dtype=torch.float32),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([self.class_index[cfg.category_map[a["category"][k]]] for k in keep],
                                   dtype=torch.int64),
            "num_lidar_pts": torch.tensor([a["num_lidar_pts"][k] for k in keep], dtype=torch.int64),
            "attributes": [a["attribute"][k] for k in keep],
            "instances": [a["instance"][k] for k in keep],
        }
        if cfg.load_points:
            out["points"] = torch.from_numpy(self._points(s, bev_aug))
        if cfg.map_grid is not None:
            ego_from_global = bev_aug @ inverse(np.array(s["global_from_ego"]))
            out["map"] = torch.from_numpy(rasterise(self.map_layers(self.index.location(s)), ego_from_global,
                                                    cfg.map_grid, cfg.map_line_width, cfg.map_classes))
        if cfg.occupancy:
            occ = read_occupancy(self.root / "gts" / out["scene"] / s["token"] / "labels.npz")
            src = None if np.allclose(bev_aug, np.eye(4)) else occupancy_source_index(bev_aug,
                                                                                       occ["semantics"].shape)
            out["occupancy"] = torch.from_numpy(transform_occupancy(occ["semantics"], src, OCC_FREE))
            out["mask_camera"] = torch.from_numpy(transform_occupancy(occ["mask_camera"], src, 0))
            out["mask_lidar"] = torch.from_numpy(transform_occupancy(occ["mask_lidar"], src, 0))
        return out

    def _points(self, s: dict, bev_aug: np.ndarray) -> np.ndarray:
        """Keyframe points plus ``sweeps`` previous sweeps, in the (augmented) ego frame, with the
        time lag to the keyframe (seconds) in the last channel. Sweep points within
        ``sweep_min_distance`` of their sensor in x and y (its own frame) are dropped, as mmdet3d's
        ``LoadPointsFromMultiSweeps(remove_close=True)`` drops them; the keyframe keeps all its points."""
        chunks = []
        sources = [(s["lidar"]["filename"], s["lidar"]["ego_from_lidar"], s["lidar"]["timestamp"])]
        sources += [(w["filename"], w["ego_from_sweep"], w["timestamp"]) for w in s["sweeps"][: self.cfg.sweeps]]
        r = self.cfg.sweep_min_distance
        for k, (fname, ego_from_sensor, ts) in enumerate(sources):
            pts = read_points(self.root / fname)
            if k and r > 0:
                pts = pts[~((np.abs(pts[:, 0]) < r) & (np.abs(pts[:, 1]) < r))]
            m = bev_aug @ np.array(ego_from_sensor)
            xyz = pts[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]
            dt = np.full((len(pts), 1), (s["lidar"]["timestamp"] - ts) * 1e-6)
            chunks.append(np.concatenate([xyz, pts[:, 3:4], dt], axis=1).astype(np.float32))
        return np.concatenate(chunks)


STACKED = ("images", "intrinsics", "img_aug", "ego_from_cam", "ego_from_lidar", "global_from_ego", "bev_aug",
           "map", "occupancy", "mask_camera", "mask_lidar")


def collate(items: list[dict]) -> dict:
    """Stack fixed-size tensors along a new batch dimension; keep variable-length ones as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if key in STACKED else values
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float, ImageNet mean and std.

    Shapes:
        images: (..., 3, H, W) uint8   returns: (..., 3, H, W) float32
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std
