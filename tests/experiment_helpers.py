"""The tiny LiDAR experiment the engine, cache and forecast tests train (importable from every test folder)."""

from pathlib import Path

import yaml


def tiny_lidar_experiment(root, out, name: str = "pp-test", bev_out: int = 16, bev_aug: bool = False,
                          **train) -> dict:
    """A PointPillars CenterPoint experiment on the tiny world, small enough to train steps in seconds.

    ``bev_out``: channels of the BEV encoder's output (what a cache stores); ``bev_aug``: BEV rotation,
    scale and flips in training; ``train``: keys of the ``train`` section over the defaults below.
    """
    data = {"root": str(root), "train_split": "mini_train", "val_split": "mini_val", "batch_size": 2,
            "eval_batch_size": 2, "workers": 0}
    if bev_aug:
        data["bev_aug"] = {"rotate": [-10, 10], "scale": [0.95, 1.05], "flip_x": 0.5, "flip_y": 0.5}
    return {
        "model": {
            "name": name,
            "grid": {"xbound": [-25.6, 25.6, 0.8], "ybound": [-25.6, 25.6, 0.8], "zbound": [-5.0, 3.0, 8.0]},
            "view_transform": None,
            "lidar": {"channels": 8, "max_voxels": 4000},
            "bev_encoder": {"channels": [16, 32, 64], "blocks": [1, 1, 1], "out_channels": bev_out},
            "heads": {"detection": {"channels": 8}},
        },
        "data": data,
        "train": {"epochs": 1, "lr": 1e-3, "log_every": 1, "accelerator": "cpu", "devices": 1, **train},
        "out": str(out),
    }


def write_yaml(path: Path, doc: dict) -> str:
    Path(path).write_text(yaml.safe_dump(doc))
    return str(path)
