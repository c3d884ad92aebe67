"""A sample at a glance: the six cameras with projected 3D boxes beside a BEV of LiDAR, boxes and map."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402
from matplotlib.patches import Polygon as MplPolygon  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402
from PIL import Image  # noqa: E402

from bevkit.data.dataset import read_points  # noqa: E402
from bevkit.data.nuscenes import CATEGORY_TO_CLASS, DataError, NuScenesTables, box_corners  # noqa: E402
from bevkit.geometry import apply, inverse, project  # noqa: E402

CLASS_COLOURS = {
    "car": "#ff9f1c", "truck": "#e71d36", "construction_vehicle": "#f6d55c", "bus": "#b5179e", "trailer": "#7209b7",
    "barrier": "#adb5bd", "motorcycle": "#06d6a0", "bicycle": "#118ab2", "pedestrian": "#4cc9f0",
    "traffic_cone": "#fb5607", None: "#d9d9d9",
}
CAMERA_GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"), ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def _map_layers(db: NuScenesTables, sample: dict):
    """Map polygons and lines of the sample's location, as global-frame arrays by layer."""
    scene = db.get("scene", sample["scene_token"])
    location = db.get("log", scene["log_token"])["location"]
    path = db.root / "maps" / "expansion" / f"{location}.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    nodes = {n["token"]: (n["x"], n["y"]) for n in m["node"]}
    polys = {p["token"]: p for p in m["polygon"]}
    lines = {ln["token"]: ln for ln in m["line"]}
    out = {}
    for layer in ("drivable_area", "walkway", "ped_crossing"):
        shapes = []
        for rec in m.get(layer, []):
            for pt in rec.get("polygon_tokens", [rec.get("polygon_token")]):
                if pt in polys:
                    ext = np.array([nodes[t] for t in polys[pt]["exterior_node_tokens"]])
                    holes = [np.array([nodes[t] for t in h["node_tokens"]]) for h in polys[pt]["holes"]]
                    shapes.append((ext, holes))
        out[layer] = shapes
    for layer in ("road_divider", "lane_divider"):
        out[layer] = [np.array([nodes[t] for t in lines[r["line_token"]]["node_tokens"]]) for r in m.get(layer, [])]
    return out


def _polygon_path(rings) -> MplPath:
    """A matplotlib path of a polygon with holes (exterior counter-clockwise, holes clockwise)."""
    verts, codes = [], []
    for i, ring in enumerate(rings):
        area2 = np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1])
        if (area2 > 0) != (i == 0):
            ring = ring[::-1]
        verts.extend(ring.tolist() + [ring[0].tolist()])
        codes.extend([MplPath.MOVETO] + [MplPath.LINETO] * (len(ring) - 1) + [MplPath.CLOSEPOLY])
    return MplPath(np.array(verts), codes)


def render_preview(root, sample_key, out, version: str | None = None, bev_range: float = 50.0) -> Path:
    """Write a PNG of one sample: six cameras with projected boxes and a BEV panel.

    ``sample_key`` is a sample token or an index in (scene, time) order.
    """
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out}: is a folder; name the PNG file to write")
    db = NuScenesTables(root, version)
    sample = db.sample(sample_key)
    boxes, names = db.boxes_ego(sample)
    classes = [CATEGORY_TO_CLASS.get(n) for n in names]

    fig = plt.figure(figsize=(22, 6.6), dpi=100)
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.05], wspace=0.02, hspace=0.04)
    for r, row in enumerate(CAMERA_GRID):
        for c, channel in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            sd = db.keyframe(sample, channel)
            path = db.root / sd["filename"]
            if not path.is_file():
                raise DataError(f"{path}: image of sample {sample['token']} ({channel}) is missing")
            try:
                with Image.open(path) as im:
                    img = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise DataError(f"{path}: cannot read image of sample {sample['token']} ({e})") from None
            ax.imshow(img)
            cam_from_ego = inverse(db.ego_from_sensor(sd))
            k = db.intrinsics(sd)
            for box, cls in zip(boxes, classes):
                corners = apply(cam_from_ego, box_corners(box))
                if (corners[:, 2] < 0.5).any():
                    continue
                uv, _ = project(k, corners)
                outside_x = uv[:, 0].max() < 0 or uv[:, 0].min() > img.shape[1]
                if outside_x or uv[:, 1].max() < 0 or uv[:, 1].min() > img.shape[0]:
                    continue
                colour = CLASS_COLOURS[cls]
                for a, b in EDGES:
                    ax.plot(uv[[a, b], 0], uv[[a, b], 1], color=colour, lw=1.0)
            ax.set_xlim(0, img.shape[1])
            ax.set_ylim(img.shape[0], 0)
            ax.set_title(channel, fontsize=9, pad=2)
            ax.axis("off")

    ax = fig.add_subplot(grid[:, 3])
    lidar_sd = db.keyframe(sample, "LIDAR_TOP")
    ego_from_global = inverse(db.global_from_ego(lidar_sd))
    layers = _map_layers(db, sample)
    for layer, style in (("drivable_area", dict(fc="#e9ecef", ec="none")), ("walkway", dict(fc="#ffe8d6", ec="none")),
                         ("ped_crossing", dict(fc="#cdb4db", ec="none", alpha=0.8))):
        for ext, holes in layers.get(layer, []):
            rings = [apply(ego_from_global, np.c_[r, np.zeros(len(r))])[:, :2] for r in [ext, *holes]]
            if np.abs(rings[0]).min(axis=0).max() > bev_range * 3:
                continue
            ax.add_patch(PathPatch(_polygon_path(rings), **style, zorder=0 if layer != "ped_crossing" else 1))
    for layer, colour in (("road_divider", "#f4a261"), ("lane_divider", "#6c757d")):
        for line in layers.get(layer, []):
            xy = apply(ego_from_global, np.c_[line, np.zeros(len(line))])[:, :2]
            ax.plot(xy[:, 0], xy[:, 1], color=colour, lw=1.0, zorder=2)
    points = read_points(db.root / lidar_sd["filename"])  # a truncated file is a DataError
    pts_ego = apply(db.ego_from_sensor(lidar_sd), points[:, :3].astype(np.float64))
    near = (np.abs(pts_ego[:, 0]) < bev_range) & (np.abs(pts_ego[:, 1]) < bev_range)
    ax.scatter(pts_ego[near, 0], pts_ego[near, 1], c=np.clip(pts_ego[near, 2], -1, 4), cmap="viridis", s=0.6,
               zorder=3, linewidths=0)
    for box, cls in zip(boxes, classes):
        corners = box_corners(box)[:4, :2]
        ax.add_patch(MplPolygon(corners, closed=True, fill=False, ec=CLASS_COLOURS[cls], lw=1.2, zorder=4))
        front = corners[[0, 3]].mean(axis=0)
        ax.plot([box[0], front[0]], [box[1], front[1]], color=CLASS_COLOURS[cls], lw=1.0, zorder=4)
    ax.add_patch(MplPolygon(box_corners([1.4, 0, 0.8, 4.8, 2.0, 1.6, 0.0])[:4, :2], closed=True, fc="k", zorder=5))
    ax.set_xlim(-bev_range, bev_range)
    ax.set_ylim(-bev_range, bev_range)
    ax.set_aspect("equal")
    ax.set_title("BEV, ego frame: x forward (right), y left (up)", fontsize=9)
    ax.tick_params(labelsize=7)
    for cls in sorted({c for c in classes if c}):
        ax.plot([], [], color=CLASS_COLOURS[cls], label=cls, lw=2)
    ax.legend(loc="lower left", fontsize=7, ncol=2, framealpha=0.8)
    scene = db.get("scene", sample["scene_token"])
    fig.suptitle(f"{scene['name']}  sample {sample['token']}  ({len(boxes)} annotations)", fontsize=11, y=0.995)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{out}: cannot create the folder {out.parent} ({e.strerror})") from None
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the preview ({e.strerror or e})") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):  # left only by a failed write
            tmp.unlink()
    return out
