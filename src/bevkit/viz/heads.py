"""A model's predictions on dataset samples drawn against ground truth: boxes, map layers, occupancy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bevkit.eval.occupancy import OCC_CLASSES

# Map cells: predicted and true, predicted only, true only (white elsewhere).
HIT, FALSE_POSITIVE, MISSED = (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.12, 0.47, 0.71)

# The x and y extent of Occ3D's labels (metres, ego frame): 200 x 200 voxels of 0.4 m.
OCC3D_EXTENT = (-40.0, 40.0, -40.0, 40.0)

# Occ3D's 18 classes (``eval.occupancy.OCC_CLASSES`` order; 17, free, is drawn white).
OCC_COLOURS = np.array([
    (0, 0, 0), (255, 120, 50), (255, 192, 203), (255, 255, 0), (0, 150, 245), (0, 255, 255), (200, 180, 0),
    (255, 0, 0), (255, 240, 150), (135, 60, 0), (160, 32, 240), (255, 0, 255), (139, 137, 137), (75, 0, 75),
    (150, 240, 80), (230, 230, 250), (0, 175, 0), (255, 255, 255)], dtype=np.uint8)


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure to ``path`` through a temporary name (never a half-written PNG)."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def map_overlay(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB of one map layer: ``HIT`` where both are set, ``FALSE_POSITIVE`` where only the prediction is,
    ``MISSED`` where only the truth is, white elsewhere.

    Shapes:
        pred, truth: (Y, X) bool   returns: (Y, X, 3) float in [0, 1]
    """
    rgb = np.ones((*pred.shape, 3))
    rgb[pred & truth] = HIT
    rgb[pred & ~truth] = FALSE_POSITIVE
    rgb[~pred & truth] = MISSED
    return rgb


def draw_map(pred: np.ndarray, truth: np.ndarray, classes, extent, path, title: str = "") -> Path:
    """One panel per map layer, prediction against ground truth (:func:`map_overlay`), with its IoU.

    Frames: ego, x forward (to the right), y left (up); ``extent`` is (xmin, xmax, ymin, ymax) in metres.

    Shapes:
        pred, truth: (K, Y, X) bool
    """
    k = len(classes)
    fig = Figure(figsize=(3.6 * k, 3.6 * (extent[3] - extent[2]) / (extent[1] - extent[0]) + 0.9), dpi=100)
    for i, name in enumerate(classes):
        ax = fig.add_subplot(1, k, i + 1)
        ax.imshow(map_overlay(pred[i], truth[i]), origin="lower", extent=extent, interpolation="nearest")
        union = (pred[i] | truth[i]).sum()
        iou = (pred[i] & truth[i]).sum() / union if union else float("nan")
        ax.set_title(f"{name}: IoU {iou:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}\nmap: both (green), predicted only (red), missed (blue)", fontsize=9)
    return _save(fig, Path(path))


def occupancy_top(labels: np.ndarray, free: int = 17) -> np.ndarray:
    """The class of the highest occupied voxel of each column, ``free`` where a column is empty.

    Shapes:
        labels: (X, Y, Z) Occ3D layout   returns: (Y, X) (rows along y, for ``origin="lower"``)
    """
    occupied = labels != free
    z = labels.shape[2]
    top = z - 1 - np.argmax(occupied[:, :, ::-1], axis=2)  # highest occupied index (any when none)
    out = np.take_along_axis(labels, top[..., None], axis=2)[..., 0]
    out[~occupied.any(axis=2)] = free
    return out.T


def draw_occupancy(pred: np.ndarray, truth: np.ndarray, visible: np.ndarray | None, extent, path,
                   title: str = "", free: int = 17) -> Path:
    """Top-down occupancy (the highest occupied voxel of each column), prediction beside ground truth;
    columns no camera sees (``visible``, Occ3D's ``mask_camera``, none of its voxels set) are shaded, as
    the metric leaves them out.

    Frames: ego, x forward (to the right), y left (up); ``extent`` is (xmin, xmax, ymin, ymax) in metres.

    Shapes:
        pred, truth: (X, Y, Z) uint8 class ids   visible: (X, Y, Z) bool or None
    """
    fig = Figure(figsize=(10, 5.4), dpi=100)
    seen = None if visible is None else visible.any(axis=2).T
    for i, (name, labels) in enumerate((("prediction", pred), ("ground truth", truth))):
        ax = fig.add_subplot(1, 2, i + 1)
        rgb = OCC_COLOURS[occupancy_top(labels, free)].astype(np.float64) / 255
        if seen is not None:
            rgb[~seen] = 0.55 + 0.45 * rgb[~seen] * 0.3
        ax.imshow(rgb, origin="lower", extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    present = sorted((set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())) - {free})
    handles = [Patch(color=OCC_COLOURS[c] / 255, label=OCC_CLASSES[c] if c < len(OCC_CLASSES) else str(c))
               for c in present if c < len(OCC_COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6) or 1, fontsize=7, frameon=False)
    fig.suptitle(f"{title}\noccupancy from above (highest occupied voxel; grey: unseen by the cameras)",
                 fontsize=9)
    return _save(fig, Path(path))


def visualise(cfg, model, split: str, samples, out_dir, score_threshold: float = 0.3) -> list[Path]:
    """Run ``model`` (put in eval mode) on samples of ``split`` as evaluation does, history frames encoded
    (a Neural Map Prior model reads an empty prior, as ``eval.map_prior: empty`` scores it, not the
    memory that online evaluation fills along a scene), and draw each head's predictions against the
    ground truth into ``out_dir``:
    ``<scene>_<token>.png`` (detection: front camera and BEV, predictions above ``score_threshold``),
    ``<scene>_<token>_map.png`` (each map layer) and ``<scene>_<token>_occupancy.png`` (from above).
    The model runs on its own device; returns the paths written."""
    from bevkit.config import ConfigError
    from bevkit.engine.data import BEVDataModule, collate_history, to_device
    from bevkit.engine.module import with_history
    from bevkit.eval.evaluator import boxes_to_results
    from bevkit.viz.predictions import render_predictions

    ds = BEVDataModule(cfg).dataset(split, train=False)
    bad = [i for i in samples if not 0 <= i < len(ds)]
    if bad:
        raise ConfigError(f"viz: sample(s) {bad} not in split {split!r} ({len(ds)} samples)")
    model.eval()
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = cfg.model.heads.boxes().attributes if "detection" in model.heads else ()
    g = cfg.model.grid
    extent = (g.xbound[0], g.xbound[1], g.ybound[0], g.ybound[1])
    written, detections = [], {}
    for i in samples:
        item = ds[i]
        batch = to_device(collate_history([item]), device)
        with torch.no_grad():
            out = model(with_history(model, batch))
            preds = model.decode(out)
        token = item["token"]
        stem = f"{item['scene']}_{token}"
        title = f"{item['scene']}  sample {token} ({split} #{i})"
        if "detection" in preds:
            det = preds["detection"][0]
            attrs = ["" if a < 0 else names[a] for a in det["attributes"].tolist()]
            detections[token] = boxes_to_results(token, det["boxes"].float().cpu(), det["scores"].float().cpu(),
                                                 det["labels"].cpu(), item["global_from_ego"].numpy(), attrs)
        if "map" in preds:
            written.append(draw_map(preds["map"][0].cpu().numpy(), item["map"].numpy().astype(bool),
                                    cfg.model.heads.map.classes, extent, out_dir / f"{stem}_map.png", title))
        if "occupancy" in preds:
            target = item["occupancy"]  # (X, Y, Z) on Occ3D's grid
            try:
                occ = model.heads["occupancy"].decode_to(out["occupancy"], target.shape)[0].cpu().numpy()
            except ValueError as e:
                raise ConfigError(f"viz: {e}") from None
            visible = item["mask_camera"].numpy().astype(bool) if "mask_camera" in item else None
            written.append(draw_occupancy(occ, target.numpy(), visible, OCC3D_EXTENT,
                                          out_dir / f"{stem}_occupancy.png", title,
                                          free=cfg.model.heads.occupancy.free_class))
    if detections:  # the tables read once for all samples
        written += render_predictions(cfg.data.root, detections, list(detections), out_dir, cfg.data.version,
                                      score_threshold=score_threshold, bev_range=max(abs(v) for v in extent))
    return written

