"""Helpers shared by the engine tests (a module of its own: every test folder has a conftest)."""

import yaml


def tiny_experiment(root, out, **train) -> dict:
    """A PointPillars CenterPoint model small enough to train a few steps in seconds."""
    return {
        "model": {
            "name": "pp-test",
            "grid": {"xbound": [-25.6, 25.6, 0.8], "ybound": [-25.6, 25.6, 0.8], "zbound": [-5.0, 3.0, 8.0]},
            "view_transform": None,
            "lidar": {"channels": 8, "max_voxels": 4000},
            "bev_encoder": {"channels": [16, 32, 64], "blocks": [1, 1, 1], "out_channels": 16},
            "heads": {"detection": {"channels": 8}},
        },
        "data": {"root": str(root), "train_split": "mini_train", "val_split": "mini_val", "batch_size": 2,
                 "eval_batch_size": 2, "workers": 0,
                 "bev_aug": {"rotate": [-10, 10], "scale": [0.95, 1.05], "flip_x": 0.5, "flip_y": 0.5}},
        "train": {"epochs": 1, "lr": 1e-3, "schedule": {"type": "cyclic"}, "ema": 0.9, "log_every": 1,
                  "accelerator": "cpu", "devices": 1, **train},
        "out": str(out),
    }


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)
