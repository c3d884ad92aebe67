"""Tracks in the agent frame, BEV patch sampling, the forecaster's loss and metrics, checkpoints."""

import math

import numpy as np
import pytest
import torch

from bevkit.data.nuscenes import NuScenesIndex
from bevkit.forecast.model import (
    Forecaster,
    displacement_metrics,
    patch_points,
    sample_bev,
)
from bevkit.forecast.tracks import build_tracks, to_agent_frame
from bevkit.forecast.train import (
    ForecastDataset,
    collate_forecast,
    evaluate_forecaster,
    load_forecaster,
    save_forecaster,
    train_forecaster,
)


@pytest.fixture(scope="module")
def tracks(tiny_root, tmp_path_factory):
    index = NuScenesIndex.load(tiny_root, cache_dir=tmp_path_factory.mktemp("index"))
    return index, build_tracks(index, "mini_train", history=2, future=3)


def test_tracks_are_the_annotations_in_each_agents_frame(tracks):
    index, t = tracks
    assert len(t) > 20
    assert np.allclose(t.history[:, -1], 0) and t.history_valid[:, -1].all()
    samples = index.split("mini_train")
    by_token = {}
    for i, s in enumerate(samples):
        for inst, box in zip(s["anns"]["instance"], s["anns"]["boxes"]):
            g = np.array(s["global_from_ego"])
            by_token[(i, inst)] = (g[:2, :2] @ np.array(box[:2]) + g[:2, 3], box[6] + math.atan2(g[1, 0], g[0, 0]))
    for a in range(0, len(t), 7):
        i, inst = int(t.sample[a]), t.instance[a]
        origin, yaw = by_token[(i, inst)]
        for k in range(3):  # the k+1-th next keyframe of the same scene holds the k-th future point
            nxt, _ = by_token[(i + k + 1, inst)]
            assert np.allclose(to_agent_frame(nxt, origin, yaw), t.future[a, k], atol=1e-3)
        for k in range(2):  # history rows are the 2nd and 1st previous keyframes, oldest first, masked if absent
            prev = by_token.get((i - 2 + k, inst))
            if prev is not None and samples[i - 2 + k]["scene_token"] == samples[i]["scene_token"]:
                assert t.history_valid[a, k]
                assert np.allclose(to_agent_frame(prev[0], origin, yaw), t.history[a, k], atol=1e-3)
            else:
                assert not t.history_valid[a, k] and np.allclose(t.history[a, k], 0)
        box = samples[i]["anns"]["boxes"][samples[i]["anns"]["instance"].index(inst)]
        assert np.allclose(t.pose[a], [box[0], box[1], box[6]], atol=1e-4)


def test_take_selects_rows_by_mask_or_index_and_may_select_none(tracks):
    _, t = tracks
    mask = t.label == t.label[0]
    by_mask, by_index = t.take(mask), t.take(np.flatnonzero(mask).tolist())
    for sub in (by_mask, by_index):
        assert len(sub) == mask.sum() and sub.instance == [t.instance[i] for i in np.flatnonzero(mask)]
        assert np.array_equal(sub.future, t.future[mask]) and sub.tokens is t.tokens
    assert t.take([2, 0]).instance == [t.instance[2], t.instance[0]]
    for none in ([], np.array([], bool), np.zeros(len(t), bool), [False] * len(t)):
        empty = t.take(none)
        assert len(empty) == 0 and empty.instance == []
        assert empty.history.shape == (0, 3, 2) and empty.future.shape == (0, 3, 2) and empty.pose.shape == (0, 3)
    assert len(build_tracks(tracks[0], "mini_train", history=2, future=50).take([])) == 0

def test_patch_points_and_bev_sampling_are_exact():
    pose = torch.tensor([[10.0, 5.0, math.pi / 2]])
    pts = patch_points(pose, (0.0, 2.0, -1.0, 1.0), (2, 2))  # agent-frame cell centres (0.5|1.5, -0.5|0.5)
    # agent x (ahead) is ego +y, agent y (left) is ego -x
    assert torch.allclose(pts[0, 0, 0], torch.tensor([10.5, 5.5]), atol=1e-6)
    assert torch.allclose(pts[0, 1, 1], torch.tensor([9.5, 6.5]), atol=1e-6)
    # A map whose value is the ego x of each cell centre: bilinear samples give the point's x exactly.
    xs = -51.2 + (torch.arange(128) + 0.5) * 0.8
    bev = torch.stack([xs.view(1, 128).expand(128, 128), xs.view(128, 1).expand(128, 128)]).unsqueeze(0)
    bev = torch.cat([bev, 2 * bev])  # two samples
    pts = torch.tensor([[[[3.3, -7.1], [20.0, 0.45]]], [[[-30.2, 12.9], [0.0, 0.0]]]])
    out = sample_bev(bev, torch.tensor([0, 1]), pts, (-51.2, 51.2, -51.2, 51.2))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([3.3, -7.1]), atol=1e-4)
    assert torch.allclose(out[1, :, 0, 0], 2 * torch.tensor([-30.2, 12.9]), atol=1e-4)
    outside = sample_bev(bev[:1], torch.tensor([0]), torch.tensor([[[[80.0, 0.0]]]]), (-51.2, 51.2, -51.2, 51.2))
    assert float(outside.abs().max()) == 0.0


def test_displacement_metrics_by_hand():
    fut = torch.zeros(1, 3, 2)
    traj = torch.zeros(1, 3, 3, 2)
    traj[0, 0, :, 0] = 3.0  # best scored, 3 m off everywhere
    traj[0, 1, :, 0] = torch.tensor([0.0, 0.0, 1.0])  # second, 1 m off at the end
    traj[0, 2, :, 0] = 10.0
    out = {"trajectories": traj, "logits": torch.tensor([[3.0, 2.0, 1.0]])}
    m = displacement_metrics(out, fut, ks=(1, 2))
    assert m["minADE_1"] == pytest.approx(3.0) and m["minFDE_1"] == pytest.approx(3.0) and m["MR_1"] == 1
    assert m["minADE_2"] == pytest.approx(1 / 3) and m["minFDE_2"] == pytest.approx(1.0) and m["MR_2"] == 0


def test_a_miss_is_the_worst_point_not_the_last():
    fut = torch.zeros(1, 3, 2)
    traj = torch.zeros(1, 1, 3, 2)
    traj[0, 0, :, 0] = torch.tensor([0.0, 2.5, 0.0])  # ends on the truth, strays 2.5 m half-way
    m = displacement_metrics({"trajectories": traj, "logits": torch.zeros(1, 1)}, fut, ks=(1,))
    assert m["minFDE_1"] == 0 and m["minADE_1"] == pytest.approx(2.5 / 3) and m["MR_1"] == 1


def test_turning_agents_and_the_moving_and_turning_subsets():
    from bevkit.forecast.tracks import AgentTracks, turning

    t = np.linspace(0.5, 3.0, 6)
    straight = np.stack([2 * t, 0 * t], 1)
    left = np.stack([np.minimum(2 * t, 3.0), np.maximum(2 * t - 3.0, 0.0)], 1)  # 3 m ahead, then 3 m to the left
    right = left * [1, -1]
    slow = np.stack([0.1 * t, 0.1 * t], 1)  # turned, but barely moving: not counted
    wiggle = np.stack([2 * t, 0.2 * np.sin(3 * t)], 1)  # under 30 degrees at the end
    fut = np.stack([straight, left, right, slow, wiggle])
    n = len(fut)
    tr = AgentTracks(["s"], np.zeros(n, np.int64), list("abcde"), np.zeros((n, 3, 2)), np.ones((n, 3), bool), fut,
                     np.zeros((n, 3)), np.zeros(n, np.int64), np.zeros(n))
    assert turning(tr).tolist() == [False, True, True, False, False]

    class Still(torch.nn.Module):  # one mode, standing still
        def forward(self, batch):
            n = len(batch["future"])
            return {"trajectories": torch.zeros(n, 1, 6, 2), "logits": torch.zeros(n, 1)}

    batch = {"future": torch.tensor(fut, dtype=torch.float32), "turning": torch.tensor(turning(tr))}
    m = evaluate_forecaster(Still(), [batch])
    final = np.linalg.norm(fut[:, -1], axis=1)
    assert m["all"]["agents"] == 5 and m["moving"]["agents"] == 4 and m["turning"]["agents"] == 2
    assert m["turning"]["minFDE_1"] == pytest.approx(final[1:3].mean(), rel=1e-6)
    assert m["moving"]["minFDE_1"] == pytest.approx(final[[0, 1, 2, 4]].mean(), rel=1e-6)
    assert m["all"]["MR_1"] == pytest.approx(4 / 5)


def test_forecaster_learns_and_round_trips(tracks, tmp_path):
    torch.set_num_threads(1)
    _, t = tracks
    # Random BEV maps (the patch branch runs, but carries no signal): the history branch must learn.
    feats = {tok: torch.randn(4, 16, 16) for tok in t.tokens}
    ds = ForecastDataset(t, feats)
    model = Forecaster(modes=3, bev_channels=4, bounds=(-51.2, 51.2, -51.2, 51.2), history=2, future=3, hidden=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_forecast)
    with torch.no_grad():
        model(collate_forecast([ds[0]]))
    before = evaluate_forecaster(model, loader)["all"]["minADE_5"]
    metrics = train_forecaster(model, ds, ds, epochs=30, out_dir=tmp_path, lr=3e-3, batch_size=4, progress=False)
    after = metrics["val"]["all"]["minADE_5"]
    assert after < 0.5 * before, (before, after)
    loaded = load_forecaster(tmp_path / "forecaster.pt")
    batch = collate_forecast([ds[0], ds[1]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)["trajectories"], loaded(batch)["trajectories"])
    raw = torch.load(tmp_path / "forecaster.pt", weights_only=True)
    assert raw["config"]["bev_channels"] == 4


def test_mirroring_an_agent_mirrors_its_patch():
    from bevkit.forecast.train import mirror_agents

    torch.manual_seed(0)
    model = Forecaster(modes=2, bev_channels=1, history=2, future=3, hidden=8, extent=(-4.0, 4.0, -4.0, 4.0),
                       cells=(4, 4)).eval()
    # A map whose value is ego y: in the frame of an agent at the origin facing +x, row r of its patch
    # sits at y = -3, -1, 1, 3; mirrored, the rows come in the opposite order.
    ys = -51.2 + (torch.arange(128) + 0.5) * 0.8
    bev = ys.view(1, 1, 128, 1).expand(1, 1, 128, 128).contiguous()
    seen = []
    model.patch.register_forward_hook(lambda m, i, o: seen.append(i[0][:, 0, :, 0].clone()))
    batch = {"history": torch.zeros(2, 3, 2), "history_valid": torch.ones(2, 3, dtype=torch.bool),
             "label": torch.zeros(2, dtype=torch.long), "future": torch.ones(2, 3, 2), "bev": bev,
             "agent_sample": torch.zeros(2, dtype=torch.long), "pose": torch.zeros(2, 3)}
    flipped = mirror_agents(batch, torch.Generator().manual_seed(0))  # one of the two mirrored
    with torch.no_grad():
        model(flipped)
    rows = seen[0]
    for a in range(2):
        want = torch.tensor([-3.0, -1.0, 1.0, 3.0])
        want = -want if flipped["mirror"][a] else want
        assert torch.allclose(rows[a], want, atol=1e-4)
        sign = -1.0 if flipped["mirror"][a] else 1.0
        assert torch.equal(flipped["future"][a, :, 1], sign * batch["future"][a, :, 1])
    assert flipped["mirror"].any() and not flipped["mirror"].all()


def test_history_only_baseline_needs_no_features(tracks, tmp_path):
    _, t = tracks
    ds = ForecastDataset(t)
    model = Forecaster(modes=2, history=2, future=3, hidden=16)
    batch = collate_forecast([ds[0], ds[1]])
    assert "bev" not in batch
    out = model(batch)
    assert out["trajectories"].shape == (len(batch["label"]), 2, 3, 2)
    save_forecaster(model, tmp_path / "f.pt")
    assert load_forecaster(tmp_path / "f.pt").bev_channels == 0
