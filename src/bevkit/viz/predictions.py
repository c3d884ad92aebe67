"""Predictions against ground truth: the front camera and a BEV panel per sample, from a results file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Polygon as MplPolygon
from PIL import Image

from bevkit.data.dataset import read_points
from bevkit.data.nuscenes import CATEGORY_TO_CLASS, NuScenesTables, box_corners
from bevkit.geometry import apply, inverse, project, quat_to_matrix
from bevkit.viz.preview import CLASS_COLOURS, EDGES

GT_COLOUR = "#2ca02c"


def results_to_ego(boxes: list[dict], ego_from_global: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Official results-format boxes (global frame) to ego-frame ``(x, y, z, l, w, h, yaw)``.

    Shapes:
        ego_from_global: (4, 4)   returns: boxes (M, 7), class names (M), scores (M,)
    """
    out = np.zeros((len(boxes), 7))
    for i, b in enumerate(boxes):
        m = np.eye(4)
        m[:3, :3] = quat_to_matrix(b["rotation"])
        m[:3, 3] = b["translation"]
        e = ego_from_global @ m
        w, l, h = b["size"]
        out[i] = [*e[:3, 3], l, w, h, np.arctan2(e[1, 0], e[0, 0])]
    return out, [b["detection_name"] for b in boxes], np.array([b["detection_score"] for b in boxes])


def render_predictions(root, results: dict, tokens, out_dir, version: str | None = None,
                       score_threshold: float = 0.3, bev_range: float = 50.0) -> list[Path]:
    """One PNG per sample token: CAM_FRONT with projected boxes and a BEV of LiDAR points, ground-truth
    boxes (green) and predictions above ``score_threshold`` (class colours, score beside them).

    ``results``: the official submission's ``results`` dict (sample token -> list of boxes).
    """
    db = NuScenesTables(root, version)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for token in tokens:
        sample = db.sample(token)
        gt, names = db.boxes_ego(sample)
        gt_keep = [i for i, n in enumerate(names) if CATEGORY_TO_CLASS.get(n)]
        lidar_sd = db.keyframe(sample, "LIDAR_TOP")
        ego_from_global = inverse(db.global_from_ego(lidar_sd))
        pred, classes, scores = results_to_ego(results.get(token, []), ego_from_global)
        keep = scores >= score_threshold
        pred, classes, scores = pred[keep], [c for c, k in zip(classes, keep) if k], scores[keep]

        fig = Figure(figsize=(16, 5.6), dpi=100)
        grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 1], wspace=0.05)
        ax = fig.add_subplot(grid[0, 0])
        sd = db.keyframe(sample, "CAM_FRONT")
        img = np.asarray(Image.open(db.root / sd["filename"]).convert("RGB"))
        ax.imshow(img)
        cam_from_ego = inverse(db.ego_from_sensor(sd))
        k = db.intrinsics(sd)
        for boxes, colours, lw in ((gt[gt_keep], [GT_COLOUR] * len(gt_keep), 1.0),
                                   (pred, [CLASS_COLOURS[c] for c in classes], 1.6)):
            for box, colour in zip(boxes, colours):
                corners = apply(cam_from_ego, box_corners(box))
                if (corners[:, 2] < 0.5).any():
                    continue
                uv, _ = project(k, corners)
                for a, b in EDGES:
                    ax.plot(uv[[a, b], 0], uv[[a, b], 1], color=colour, lw=lw)
        ax.set_xlim(0, img.shape[1])
        ax.set_ylim(img.shape[0], 0)
        ax.set_title("CAM_FRONT: ground truth (green), predictions (class colours)", fontsize=9)
        ax.axis("off")

        ax = fig.add_subplot(grid[0, 1])
        points = read_points(db.root / lidar_sd["filename"])  # a truncated file is a DataError
        pts = apply(db.ego_from_sensor(lidar_sd), points[:, :3].astype(np.float64))
        near = (np.abs(pts[:, 0]) < bev_range) & (np.abs(pts[:, 1]) < bev_range)
        ax.scatter(pts[near, 0], pts[near, 1], c="#9a9a9a", s=0.3, linewidths=0, zorder=1)
        for box in gt[gt_keep]:
            ax.add_patch(MplPolygon(box_corners(box)[:4, :2], closed=True, fill=False, ec=GT_COLOUR, lw=2.2,
                                    zorder=2))
        for box, cls, score in zip(pred, classes, scores):
            corners = box_corners(box)[:4, :2]
            ax.add_patch(MplPolygon(corners, closed=True, fill=False, ec=CLASS_COLOURS[cls], lw=1.4, zorder=3))
            front = corners[[0, 3]].mean(axis=0)
            ax.plot([box[0], front[0]], [box[1], front[1]], color=CLASS_COLOURS[cls], lw=0.8, zorder=3)
        ax.set_xlim(-bev_range, bev_range)
        ax.set_ylim(-bev_range, bev_range)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.plot([], [], color=GT_COLOUR, lw=2, label="ground truth")
        for cls in sorted(set(classes)):
            ax.plot([], [], color=CLASS_COLOURS[cls], lw=2, label=cls)
        ax.legend(loc="lower left", fontsize=7, ncol=2, framealpha=0.8)
        ax.set_title(f"BEV (ego, x right, y up): {len(gt_keep)} GT, {len(pred)} predictions >= {score_threshold}",
                     fontsize=9)
        scene = db.get("scene", sample["scene_token"])
        fig.suptitle(f"{scene['name']}  sample {token}", fontsize=10)
        path = out_dir / f"{scene['name']}_{token}.png"
        tmp = out_dir / f".{path.stem}.tmp.png"
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, path)
        written.append(path)
    return written
