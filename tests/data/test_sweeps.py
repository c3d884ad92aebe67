"""Multi-sweep points: the car's own returns in earlier sweeps are dropped, the keyframe keeps all."""

import numpy as np
import pytest

import bevkit.data.dataset as dataset
from bevkit.config import ConfigError, experiment_from_dict
from bevkit.data.dataset import DataConfig, NuScenesDataset
from bevkit.data.nuscenes import DataError


def test_sweep_points_close_to_their_sensor_are_dropped(tiny_root, monkeypatch):
    # Every file reads as: one point 0.5 m from the sensor, one 0.5 m / 3 m, one far away.
    pts = np.array([[0.5, -0.5, 0.0, 1.0, 0.0], [0.5, 3.0, 0.0, 1.0, 0.0], [5.0, 5.0, 0.0, 1.0, 0.0]], np.float32)
    monkeypatch.setattr(dataset, "read_points", lambda path: pts.copy())
    counts = {}
    for r in (1.0, 0.0):
        ds = NuScenesDataset(tiny_root, "mini_val", DataConfig(cameras=(), sweeps=3, sweep_min_distance=r))
        i = next(k for k, s in enumerate(ds.samples) if len(s["sweeps"]) >= 3)
        points = ds[i]["points"].numpy()
        counts[r] = [int((np.isclose(points[:, 4], dt)).sum()) for dt in np.unique(points[:, 4])]
    assert counts[1.0] == [3, 2, 2, 2]  # the keyframe (dt 0) keeps its near point, each sweep drops it
    assert counts[0.0] == [3, 3, 3, 3]


def test_more_sweeps_than_the_index_keeps_is_an_error(tiny_root):
    with pytest.raises(DataError, match="previous sweeps"):
        NuScenesDataset(tiny_root, "mini_val", DataConfig(cameras=(), sweeps=11))
    with pytest.raises(ConfigError, match="sweeps"):
        experiment_from_dict({"data": {"sweeps": 11}})
    with pytest.raises(ConfigError, match="sweep_min_distance"):
        experiment_from_dict({"data": {"sweep_min_distance": -1}})


def test_the_close_point_radius_keys_caches_and_digests_only_with_sweeps():
    from bevkit.cache.manifest import config_hash

    lidar = {"model": {"view_transform": None, "lidar": {"channels": 8}}}

    def cfg(**data):
        return experiment_from_dict({**lidar, "data": data})

    assert config_hash(cfg(sweeps=2)) != config_hash(cfg(sweeps=2, sweep_min_distance=0.0))
    assert cfg(sweeps=2).digest() != cfg(sweeps=2, sweep_min_distance=0.0).digest()
    assert config_hash(cfg()) == config_hash(cfg(sweep_min_distance=0.0))  # no sweeps: no effect
    assert cfg().digest() == cfg(sweep_min_distance=0.0).digest()
