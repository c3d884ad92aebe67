"""Fixtures for the cache tests: a tiny trained checkpoint and one uninterrupted cache of its features."""

import os

import pytest
import torch
from cache_helpers import SPLIT, tiny_config, write_yaml


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder on one thread (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """A private index cache and one thread, for this process and the processes the tests start."""
    path = tmp_path_factory.mktemp("index-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEVKIT_CACHE", str(path))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield dict(os.environ)


@pytest.fixture(scope="session")
def tiny_model(tiny_root, tmp_path_factory, cache_env):
    """(config path, checkpoint path) of the tiny model trained for two steps."""
    from bevkit.config import load_experiment
    from bevkit.engine import train

    folder = tmp_path_factory.mktemp("cache-model")
    cfg_path = write_yaml(folder / "pp.yaml", tiny_config(tiny_root, folder / "run"))
    torch.set_num_threads(1)
    train(load_experiment(cfg_path), progress=False)
    return cfg_path, folder / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def reference_cache(tiny_model, tmp_path_factory):
    """An uninterrupted single-process cache of the training split (float16): (folder, report)."""
    from bevkit.cache import write_cache
    from bevkit.config import load_experiment

    cfg_path, ckpt = tiny_model
    out = tmp_path_factory.mktemp("reference") / "cache"
    torch.set_num_threads(1)
    report = write_cache(load_experiment(cfg_path), ckpt, out, split=SPLIT, shard=(0, 1), progress=False)
    return out, report
