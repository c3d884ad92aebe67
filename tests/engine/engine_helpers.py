"""Helpers shared by the engine tests."""

from experiment_helpers import tiny_lidar_experiment, write_yaml

__all__ = ["tiny_experiment", "write_yaml"]


def tiny_experiment(root, out, **train) -> dict:
    """The tiny LiDAR experiment with BEV augmentation, a cyclic schedule and an EMA."""
    return tiny_lidar_experiment(root, out, bev_aug=True, **{"schedule": {"type": "cyclic"}, "ema": 0.9, **train})
