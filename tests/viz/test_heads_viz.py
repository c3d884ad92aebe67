"""Predictions drawn against ground truth: map overlays, occupancy from above, `bevkit viz` end to end."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bevkit.viz.heads import FALSE_POSITIVE, HIT, MISSED, OCC_COLOURS, map_overlay, occupancy_top

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_map_overlay_colours_hits_false_positives_and_misses():
    truth = np.zeros((4, 6), bool)
    truth[1, :4] = True
    pred = np.zeros((4, 6), bool)
    pred[1, 2:] = True
    rgb = map_overlay(pred, truth)
    np.testing.assert_array_equal(rgb[1, 2:4], [HIT, HIT])
    np.testing.assert_array_equal(rgb[1, 4:], [FALSE_POSITIVE, FALSE_POSITIVE])
    np.testing.assert_array_equal(rgb[1, :2], [MISSED, MISSED])
    assert (rgb[[0, 2, 3]] == 1).all()  # white where neither is set


def test_occupancy_from_above_takes_the_highest_occupied_voxel():
    free = 17
    labels = np.full((3, 2, 4), free, np.uint8)  # (X, Y, Z)
    labels[0, 0, 0] = 11  # ground only
    labels[1, 0, :3] = (11, 4, 4)  # a car on the ground
    labels[2, 1, 1] = 9  # a floating voxel
    top = occupancy_top(labels, free)
    assert top.shape == (2, 3)  # (Y, X): rows along y for origin="lower"
    assert top[0, 0] == 11 and top[0, 1] == 4 and top[1, 2] == 9
    assert top[1, 0] == top[1, 1] == top[0, 2] == free


def test_visualise_draws_map_and_occupancy_heads(tiny_root, tmp_path):
    from bevkit.config import load_experiment
    from bevkit.engine.checkpoint import build_experiment_model
    from bevkit.viz.heads import visualise

    # Untrained models: the pictures, not their quality.
    for preset, suffix in (("lidar-map-synth", "_map.png"), ("bevdet-occ-synth", "_occupancy.png")):
        cfg = load_experiment(CONFIGS / f"{preset}.yaml", [f"data.root={tiny_root}", "data.val_split=mini_val"])
        torch.manual_seed(0)
        model = build_experiment_model(cfg).eval()
        paths = visualise(cfg, model, "mini_val", [1], tmp_path / preset)
        drawn = [p for p in paths if p.name.endswith(suffix)]
        assert len(drawn) == 1, paths
        assert not list((tmp_path / preset).glob(".*"))  # no temporary file left
        pixels = np.asarray(Image.open(drawn[0]).convert("RGB")).reshape(-1, 3)
        if suffix == "_occupancy.png":  # the ground truth's drivable surface is drawn in its class colour
            assert (pixels == OCC_COLOURS[11]).all(axis=1).sum() > 100
        else:  # the ground-truth roads appear, as hits or misses
            colours = [np.round(255 * np.array(c)).astype(np.uint8) for c in (HIT, MISSED)]
            assert sum((np.abs(pixels.astype(int) - c) <= 1).all(axis=1).sum() for c in colours) > 100


def test_map_panels_put_ego_forward_right_and_left_up(tmp_path):
    # A non-square raster (Y=12, X=24 over 24 m x 12 m): a missed cell block in the front-left quadrant
    # (x > 0, y > 0) must be drawn right of and above a false-positive block in the back-right one.
    from bevkit.viz.heads import draw_map

    truth = np.zeros((1, 12, 24), bool)
    truth[0, 6:, 12:] = True  # rows: y, columns: x
    pred = np.zeros_like(truth)
    pred[0, :6, :12] = True
    path = draw_map(pred, truth, ["divider"], (-12.0, 12.0, -6.0, 6.0), tmp_path / "m.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)

    def where(colour):
        rows, cols = np.nonzero((np.abs(pixels - np.round(255 * np.array(colour))) <= 1).all(axis=-1))
        assert len(rows) > 100
        return rows.mean(), cols.mean()

    (front_row, front_col), (back_row, back_col) = where(MISSED), where(FALSE_POSITIVE)
    assert front_col > back_col  # x forward to the right
    assert front_row < back_row  # y left upwards (origin="lower")
