"""Neural Map Prior in the engine: the memory filled in time order while training and evaluating, the
two-stage start from a baseline (``train.init_from``), and the sampler that keeps scenes in time order."""

import json

import pytest
import torch
from engine_helpers import write_yaml
from experiment_helpers import tiny_lidar_experiment

from bevkit.cli import main
from bevkit.config import experiment_from_dict
from bevkit.engine.checkpoint import CheckpointError, init_weights
from bevkit.engine.data import BEVDataModule, SceneSampler
from bevkit.engine.module import BEVLitModule


def map_experiment(root, out, prior: bool, **train) -> dict:
    doc = tiny_lidar_experiment(root, out, name="map-prior-test" if prior else "map-test", **train)
    doc["model"]["heads"] = {"detection": None, "map": {"channels": 8}}
    doc["model"]["bev_encoder"]["out_channels"] = 8
    if prior:
        doc["model"]["map_prior"] = {"heads": 2, "window": 4, "ffn": 16}
    return doc


def test_time_ordered_sampling_permutes_whole_scenes():
    scenes = ["a"] * 3 + ["b"] * 2 + ["c"] * 4
    order = list(SceneSampler(scenes, True, seed=3, time_order=True))
    idx = [i for i, _ in order]
    assert sorted(idx) == list(range(9))
    # Each scene's samples appear together and in time order.
    for name in "abc":
        pos = [i for i in idx if scenes[i] == name]
        first = idx.index(pos[0])
        assert idx[first:first + len(pos)] == pos == sorted(pos)
    # Other epochs, other scene orders; two ranks get contiguous runs of equal length.
    s = SceneSampler(scenes, True, seed=3, time_order=True)
    epochs = set()
    for e in range(6):
        s.set_epoch(e)
        epochs.add(tuple(i for i, _ in s))
    assert len(epochs) > 1
    parts = [list(SceneSampler(scenes, True, seed=3, rank=r, world=2, time_order=True)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert [i for i, _ in parts[0]] + [i for i, _ in parts[1]][:4] == idx


def test_training_and_evaluation_fill_their_own_memories(tiny_root, tmp_path, index_cache):
    torch.manual_seed(0)
    cfg = experiment_from_dict(map_experiment(tiny_root, tmp_path / "run", prior=True, bev_aug=True), "test")
    module = BEVLitModule(cfg)
    dm = BEVDataModule(cfg)
    loader = dm.train_dataloader()
    assert loader.sampler.time_order  # train.order: auto -> scenes in time order for a map prior
    other = experiment_from_dict(map_experiment(tiny_root, tmp_path / "o", prior=True, order="shuffle"), "test")
    assert not BEVDataModule(other).train_dataloader().sampler.time_order
    batches = iter(loader)
    first, second = next(batches), next(batches)
    assert first["scene"][0] == second["scene"][0]  # one scene, in time order
    assert first["timestamp"][-1] < second["timestamp"][0]
    module.run(first, "train")
    memory = module.memory("train")
    assert memory.observed_cells() > 0 and "eval" not in module.memories
    # The next keyframes of the same drive see what the first ones wrote (the ego moved a few metres).
    from bevkit.engine.module import global_from_bev

    _, observed = memory.read(second["location"], global_from_bev(second), cfg.model.grid.spec())
    assert observed.mean() > 0.3
    module.model.loss(module.run(second, "train"), second)["loss"].backward()
    assert all(p.grad is not None for p in module.model.map_prior.parameters())
    module.on_train_epoch_start()  # every epoch starts from an empty map
    assert memory.observed_cells() == 0
    module.run(next(iter(dm.val_dataloader())), "eval")
    assert module.memory("eval").observed_cells() > 0 and memory.observed_cells() == 0
    # The whole training split, each scene in time order, for eval.map_prior: train.
    prior_batches = list(dm.prior_dataloader())
    assert sum(len(b["token"]) for b in prior_batches) == dm.train_samples()
    seen = [(sc, t) for b in prior_batches for sc, t in zip(b["scene"], b["timestamp"])]
    for name in {sc for sc, _ in seen}:
        stamps = [t for sc, t in seen if sc == name]
        assert stamps == sorted(stamps)
        first = next(i for i, (sc, _) in enumerate(seen) if sc == name)
        assert all(sc == name for sc, _ in seen[first:first + len(stamps)])  # one scene at a time


def test_second_stage_starts_from_the_baseline_and_evaluates(tiny_root, tmp_path, index_cache, capsys):
    base = write_yaml(tmp_path / "base.yaml", map_experiment(tiny_root, tmp_path / "base", prior=False, max_steps=2))
    assert main(["train", base]) == 0
    ckpt = tmp_path / "base" / "checkpoints" / "last.ckpt"
    stage2 = write_yaml(tmp_path / "prior.yaml", map_experiment(tiny_root, tmp_path / "prior", prior=True,
                                                                  max_steps=2, init_from=str(ckpt)))
    # The weights of the baseline, and a fresh map prior.
    cfg = experiment_from_dict(map_experiment(tiny_root, tmp_path / "x", prior=True), "test")
    module = BEVLitModule(cfg)
    fresh = init_weights(module.model, ckpt)
    assert fresh and all(k.startswith("map_prior.") for k in fresh)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    own = module.model.state_dict()
    assert all(torch.equal(own[k[len("model."):]], v) for k, v in saved.items() if k.startswith("model."))
    assert main(["train", stage2]) == 0
    assert main(["eval", stage2, str(tmp_path / "prior" / "checkpoints" / "last.ckpt"),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "map_metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0
    online = metrics["map_prior"]
    assert online["mode"] == "online" and online["cells_before_evaluation"] == 0
    assert online["cells_after_evaluation"] > 1000 and online["memory_MiB"] > 0
    # With the memory first filled from the training drives, and with an empty prior.
    for mode in ("train", "empty"):
        assert main(["eval", stage2, str(tmp_path / "prior" / "checkpoints" / "last.ckpt"), "--set",
                     f"eval.map_prior={mode}", "--out", str(tmp_path / f"eval-{mode}")]) == 0
    other = {m: json.loads((tmp_path / f"eval-{m}" / "map_metrics.json").read_text()) for m in ("train", "empty")}
    assert all(0.0 <= o["mIoU"] <= 1.0 for o in other.values())
    train = other["train"]["map_prior"]
    assert train["cells_before_evaluation"] > 1000  # the training drives, before the first evaluated sample
    assert train["cells_after_evaluation"] >= train["cells_before_evaluation"]
    assert other["empty"]["map_prior"] == {"mode": "empty", "cells_before_evaluation": 0,
                                           "cells_after_evaluation": 0, "memory_MiB": 0.0}
    # A checkpoint of another architecture is refused, naming what does not fit.
    det = tiny_lidar_experiment(tiny_root, tmp_path / "det", max_steps=1)
    assert main(["train", write_yaml(tmp_path / "det.yaml", det)]) == 0
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="not in this model"):
        init_weights(BEVLitModule(cfg).model, tmp_path / "det" / "checkpoints" / "last.ckpt")
