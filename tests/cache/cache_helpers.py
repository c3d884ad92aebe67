"""Helpers shared by the cache tests (a module of its own: conftest modules do not import across folders)."""

import json
from pathlib import Path

from experiment_helpers import tiny_lidar_experiment, write_yaml

__all__ = ["SPLIT", "entry_bytes", "manifest_without_times", "tiny_config", "write_yaml"]

SPLIT = "mini_train"  # the tiny world's first scene: six keyframes, three batches of two


def tiny_config(root, out) -> dict:
    """The tiny LiDAR experiment, two training steps: enough to cache a split in seconds."""
    return tiny_lidar_experiment(root, out, name="pp-cache-test", max_steps=2, ema=0.9, threads=1)


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
