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


def _forecaster(path, bev_channels: int, future: int) -> str:
    """A forecaster.pt as `forecast train` writes it (untrained), for the tiny caches' grid."""
    from bevkit.forecast.model import Forecaster
    from bevkit.forecast.train import save_forecaster

    model = Forecaster(modes=3, bev_channels=bev_channels, bounds=(-25.6, 25.6, -25.6, 25.6), history=2,
                       future=future, hidden=16)
    if bev_channels:
        with torch.no_grad():  # materialise the lazy layer
            model.patch(torch.zeros(1, bev_channels, *model.cells))
    save_forecaster(model, path)
    return str(path)


def test_forecast_refuses_a_cache_of_another_dataset(caches, tiny_root, tmp_path, capsys, monkeypatch):
    import shutil

    from bevkit.cache import load_manifest
    from bevkit.data.nuscenes import NuScenesIndex

    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    # The same scenes and sample tokens, one table rewritten (one more byte): another dataset identity.
    other = tmp_path / "other"
    shutil.copytree(tiny_root / "v1.0-mini", other / "v1.0-mini")
    log = other / "v1.0-mini" / "log.json"
    log.write_text(log.read_text() + "\n")
    ident = NuScenesIndex.load(other).identity
    cached = load_manifest(folder / "mini_train")["dataset"]["identity"]
    assert ident != cached
    common = ["--set", f"data.root={other}"]
    train_args = ["--train-cache", str(folder / "mini_train"), "--val-cache", str(folder / "mini_val"), "--history",
                  "2", "--future", "3", "--epochs", "1", "--modes", "3"]
    runs = [(["forecast", "train", str(cfg_path), *train_args, "--out", str(tmp_path / "bev"), *common], "mini_train"),
            (["forecast", "train", str(cfg_path), *train_args, "--out", str(tmp_path / "hist"), "--history-only",
              *common], "mini_train"),
            (["forecast", "eval", str(cfg_path), _forecaster(tmp_path / "h.pt", 0, 3), "--cache",
              str(folder / "mini_val"), *common], "mini_val"),
            (["forecast", "eval", str(cfg_path), _forecaster(tmp_path / "b.pt", 8, 3), "--cache",
              str(folder / "mini_val"), *common], "mini_val")]
    for argv, split in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"bevkit: error: {folder / split}: written from another dataset") and err.count("\n") == 1
        assert cached in err and ident in err and str(other) in err
    assert not (tmp_path / "bev").exists() and not (tmp_path / "hist").exists()


def test_forecast_says_when_no_agent_has_the_future_asked_for(caches, tmp_path, capsys, monkeypatch):
    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    runs = [["forecast", "train", str(cfg_path), "--train-cache", str(folder / "mini_train"), "--val-cache",
             str(folder / "mini_val"), "--history", "2", "--future", "50", "--out", str(tmp_path / "x"), *extra]
            for extra in ([], ["--history-only"])]
    runs.append(["forecast", "eval", str(cfg_path), _forecaster(tmp_path / "f.pt", 8, 50), "--cache",
                 str(folder / "mini_val")])
    for argv, split in zip(runs, ("mini_train", "mini_train", "mini_val")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"bevkit: error: split {split!r} of ") and err.count("\n") == 1
        assert err.rstrip().endswith("has no agent with 50 future keyframes")


@pytest.mark.parametrize("option, value, needle", [
    ("--lr", "-1", "--lr must be a positive number, got -1.0"),
    ("--lr", "0", "--lr must be a positive number, got 0.0"),
    ("--lr", "nan", "--lr must be a positive number, got nan"),
    ("--lr", "inf", "--lr must be a positive number, got inf"),
    ("--seed", "-1", "--seed must be from 0 to 2**64 - 1, got -1"),
    ("--seed", str(2**64), f"--seed must be from 0 to 2**64 - 1, got {2**64}"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--modes", "0", "--modes must be at least 1, got 0"),
    ("--batch-size", "-2", "--batch-size must be at least 1, got -2"),
    ("--history", "0", "--history must be at least 1, got 0"),
    ("--future", "0", "--future must be at least 1, got 0"),
])
def test_forecast_train_refuses_bad_numbers_in_one_line(caches, tmp_path, capsys, monkeypatch, option, value,
                                                         needle):
    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    rc = main(["forecast", "train", str(cfg_path), "--train-cache", str(folder / "mini_train"), "--val-cache",
               str(folder / "mini_val"), "--history", "2", "--future", "3", "--epochs", "1",
               "--out", str(tmp_path / "x"), option, value])
    assert rc == 2
    assert capsys.readouterr().err == f"bevkit: error: {needle}\n"
    assert not (tmp_path / "x").exists()


def test_forecast_refuses_features_of_another_model_or_dtype(caches, tmp_path, capsys, monkeypatch):
    from bevkit.cache import write_cache
    from bevkit.config import load_experiment

    cfg_path, folder = caches
    monkeypatch.setenv("BEVKIT_CACHE", str(folder / "index"))
    other = tmp_path / "mini_val-float32"
    write_cache(load_experiment(cfg_path), folder / "run" / "checkpoints" / "last.ckpt", other, split="mini_val",
                dtype="float32", shard=(0, 1), progress=False)
    common = ["--history", "2", "--future", "3", "--epochs", "1", "--modes", "3"]
    rc = main(["forecast", "train", str(cfg_path), "--train-cache", str(folder / "mini_train"), "--val-cache",
               str(other), *common, "--out", str(tmp_path / "mixed")])
    err = capsys.readouterr().err
    assert rc == 2 and "features come from another model or storage" in err and "dtype" in err
    assert main(["forecast", "train", str(cfg_path), "--train-cache", str(folder / "mini_train"), "--val-cache",
                 str(folder / "mini_val"), *common, "--out", str(tmp_path / "ok")]) == 0
    raw = torch.load(tmp_path / "ok" / "forecaster.pt", weights_only=True)
    assert raw["trained_on"]["dtype"] == "float16"
    capsys.readouterr()
    rc = main(["forecast", "eval", str(cfg_path), str(tmp_path / "ok" / "forecaster.pt"), "--cache", str(other)])
    assert rc == 2 and "features come from another model or storage" in capsys.readouterr().err
