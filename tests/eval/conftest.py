"""Fixtures for the evaluation tests: bevkit's tables of the tiny dataset, the devkit when installed."""

import pytest


@pytest.fixture(scope="session")
def tables(tiny_root):
    from bevkit.data.nuscenes import NuScenesTables

    return NuScenesTables(tiny_root, "v1.0-mini")


@pytest.fixture(scope="session")
def nusc(tiny_root):
    nuscenes = pytest.importorskip("nuscenes")
    del nuscenes
    from nuscenes import NuScenes

    return NuScenes("v1.0-mini", str(tiny_root), verbose=False)
