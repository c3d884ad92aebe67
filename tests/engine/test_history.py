"""History frames of temporal models: most recent first, the current frame standing in before a scene's start."""

import numpy as np

from bevkit.data.dataset import DataConfig, NuScenesDataset
from bevkit.engine.data import HistoryDataset


def test_history_frames_follow_bevdet_padding(tiny_root, index_cache):
    base = NuScenesDataset(tiny_root, "mini_val", DataConfig(image_size=(32, 88), cameras=("CAM_FRONT",)))
    ds = HistoryDataset(base, history=3)
    tokens = [s["token"] for s in base.samples]
    assert base.samples[0]["prev"] == "" and base.samples[1]["prev"] == tokens[0]  # one scene, in time order
    for i, expected in [(0, [0, 0, 0]), (1, [0, 1, 1]), (2, [1, 0, 2]), (4, [3, 2, 1])]:
        item = ds[i]
        got = [h["token"] for h in item["history"]]
        assert got == [tokens[j] for j in expected], i
        for h, m in zip(item["history"], item["curr_from_prev"].numpy()):
            if h["token"] == tokens[i]:  # a stand-in: the current frame itself, no motion
                np.testing.assert_allclose(m, np.eye(4), atol=1e-6)
            else:
                assert not np.allclose(m, np.eye(4), atol=1e-3)  # the ego moved between keyframes
