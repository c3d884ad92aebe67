"""Fixtures for the engine tests: a tiny LiDAR experiment on the tiny synthetic world."""

import pytest
import torch
from engine_helpers import tiny_experiment, write_yaml


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder on one thread (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def index_cache(tmp_path_factory):
    """A private index cache for the engine tests (and the processes they start)."""
    path = tmp_path_factory.mktemp("index-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEVKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def trained_run(tiny_root, tmp_path_factory, index_cache):
    """(config path, checkpoint path) of a tiny model trained for one epoch."""
    from bevkit.config import load_experiment
    from bevkit.engine import train

    folder = tmp_path_factory.mktemp("trained")
    cfg_path = write_yaml(folder / "pp.yaml", tiny_experiment(tiny_root, folder / "run"))
    torch.set_num_threads(1)
    train(load_experiment(cfg_path), progress=False)
    return cfg_path, folder / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def two_scene_root(tiny_root, tmp_path_factory):
    """The tiny world with an extra split ``both`` holding its two scenes (tables copied, files linked)."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("two-scenes") / "tiny"
    root.mkdir()
    for entry in tiny_root.iterdir():
        if entry.name == "v1.0-mini":
            shutil.copytree(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    splits = json.loads((root / "v1.0-mini" / "splits.json").read_text())
    splits["both"] = sorted(splits["mini_train"] + splits["mini_val"])
    (root / "v1.0-mini" / "splits.json").write_text(json.dumps(splits))
    return root
