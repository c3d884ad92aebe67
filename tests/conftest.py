"""Shared fixtures: one tiny synthetic nuScenes-format dataset per test run."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch on one thread during the test (what the engine, cache and export tests run under)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """The ``tiny`` preset (two v1.0-mini scenes of six keyframes), written once per run."""
    from bevkit.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "tiny"
    generate(root, preset="tiny", seed=0, workers=2, progress=False)
    return root
