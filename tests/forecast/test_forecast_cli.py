"""`bevkit forecast train|eval` on caches written by `bevkit cache`: the user's path end to end."""

import json

import pytest
import torch
from experiment_helpers import tiny_lidar_experiment, write_yaml

from bevkit.cli import main


@pytest.fixture(scope="module")
def caches(tiny_root, tmp_path_factory):
    """A tiny LiDAR model trained two steps, and caches of its features for both splits."""
    from bevkit.cache import write_cache
    from bevkit.config import load_experiment
    from bevkit.engine import train

    folder = tmp_path_factory.mktemp("forecast-cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEVKIT_CACHE", str(folder / "index"))
        doc = tiny_lidar_experiment(tiny_root, folder / "run", name="pp-forecast-test", bev_out=8, max_steps=2)
        cfg_path = folder / "pp.yaml"
        write_yaml(cfg_path, doc)
        torch.set_num_threads(1)
        cfg = load_experiment(cfg_path)
        train(cfg, progress=False)
        ckpt = folder / "run" / "checkpoints" / "last.ckpt"
        for split in ("mini_train", "mini_val"):
            write_cache(cfg, ckpt, folder / split, split=split, shard=(0, 1), progress=False)
        yield cfg_path, folder


def test_forecast_train_and_eval_from_caches(caches, tmp_path, capsys, monkeypatch):
    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    common = ["--train-cache", str(folder / "mini_train"), "--val-cache", str(folder / "mini_val"),
              "--history", "2", "--future", "3", "--epochs", "2", "--modes", "3"]
    for variant, extra in (("bev", []), ("history", ["--history-only"])):
        out = tmp_path / variant
        assert main(["forecast", "train", str(cfg_path), *common, "--out", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        assert "minADE_5" in printed and "turning" in printed
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["variant"] == ("bev" if variant == "bev" else "history-only")
        assert metrics["val"]["all"]["agents"] == metrics["val_agents"] > 0
        raw = torch.load(out / "forecaster.pt", weights_only=True)
        assert (raw["config"]["bev_channels"] > 0) == (variant == "bev")
    assert main(["forecast", "eval", str(cfg_path), str(tmp_path / "bev" / "forecaster.pt"),
                 "--cache", str(folder / "mini_val")]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[0] == printed_first_line(tmp_path / "bev" / "metrics.json")


def printed_first_line(metrics_path) -> str:
    m = json.loads(metrics_path.read_text())["val"]["all"]
    figures = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "agents")
    return f"all ({m['agents']} agents): {figures}"


def test_forecast_refuses_a_cache_of_another_config(caches, tmp_path, capsys, monkeypatch):
    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    rc = main(["forecast", "train", str(cfg_path), "--train-cache", str(folder / "mini_train"), "--val-cache",
               str(folder / "mini_val"), "--future", "3", "--history", "2", "--out", str(tmp_path / "x"),
               "--set", "model.bev_encoder.out_channels=16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "out_channels" in err and err.count("\n") == 1
