"""Helpers shared by the cache tests (a module of its own: conftest modules do not import across folders)."""

import json
from pathlib import Path

import yaml

SPLIT = "mini_train"  # the tiny world's first scene: six keyframes, three batches of two


def tiny_config(root, out) -> dict:
    """A PointPillars CenterPoint model small enough to train two steps and cache a split in seconds."""
    return {
        "model": {
            "name": "pp-cache-test",
            "grid": {"xbound": [-25.6, 25.6, 0.8], "ybound": [-25.6, 25.6, 0.8], "zbound": [-5.0, 3.0, 8.0]},
            "view_transform": None,
            "lidar": {"channels": 8, "max_voxels": 4000},
            "bev_encoder": {"channels": [16, 32, 64], "blocks": [1, 1, 1], "out_channels": 16},
            "heads": {"detection": {"channels": 8}},
        },
        "data": {"root": str(root), "train_split": "mini_train", "val_split": "mini_val", "batch_size": 2,
                 "eval_batch_size": 2, "workers": 0},
        "train": {"epochs": 1, "max_steps": 2, "lr": 1e-3, "ema": 0.9, "log_every": 1, "accelerator": "cpu",
                  "devices": 1, "threads": 1},
        "out": str(out),
    }


def write_yaml(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def entry_bytes(folder: Path) -> dict[str, bytes]:
    """Every entry file of a cache folder by name."""
    return {p.name: p.read_bytes() for p in sorted((Path(folder) / "entries").iterdir())}


def manifest_without_times(folder: Path) -> dict:
    """``manifest.json`` without what legitimately differs between equal caches: run times and the
    checkpoint path as given."""
    doc = json.loads((Path(folder) / "manifest.json").read_text())
    for s in doc["shards"]:
        s.pop("finished")
    return doc
