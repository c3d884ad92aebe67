"""`bevkit bench`: stage latencies that add up and follow where the time goes, FLOPs, memory, errors."""

import json
import time
from pathlib import Path

import torch
from torch import nn

from bevkit.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_bench_cli_reports_stages_throughput_memory_and_flops(trained_run, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    out = tmp_path / "bench.json"
    assert main(["bench", cfg_path, str(ckpt), "--repeats", "3", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "GFLOPs per forward" in printed and f"wrote {out}" in printed
    rep = json.loads(out.read_text())
    lat = rep["latency_ms"]
    assert list(lat) == ["total", "history", "forward", "lidar", "bev_encoder", "heads.detection", "other", "decode"]
    for t in lat.values():
        assert 0 <= t["min"] <= t["median"] <= t["max"]
    assert lat["forward"]["min"] > 0 and lat["decode"]["min"] > 0
    assert rep["fps"] == rep["batch"] / (lat["total"]["median"] / 1e3)
    assert rep["input"]["split"] == "mini_val" and len(rep["input"]["tokens"]) == 1 and rep["input"]["points"][0] > 0

    # The FLOPs equal PyTorch's counter on the same forward (PointPillars has no sparse product), the
    # parameters the model's, and the memory is the peak of live tensors, more than the BEV output alone.
    from torch.utils.flop_counter import FlopCounterMode

    from bevkit.bench import bench_input
    from bevkit.config import load_experiment
    from bevkit.export import load_trained

    cfg = load_experiment(cfg_path)
    model = load_trained(cfg, ckpt)
    batch, _ = bench_input(cfg, model, "mini_val", 0, 1, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch)
    assert rep["flops"]["gflops"] == rep["flops"]["counted"] == counter.get_total_flops() / 1e9 > 0
    assert rep["params_m"]["total"] * 1e6 == sum(p.numel() for p in model.parameters())
    ny, nx = cfg.model.grid.shape
    assert rep["memory"]["peak_mib"] > 4 * ny * nx * cfg.model.lidar.channels / 2**20


class _Slow(nn.Module):
    """A module that takes ``seconds`` longer than the one it wraps."""

    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, *args):
        time.sleep(self.seconds)
        return self.inner(*args)


def test_stage_times_follow_where_the_time_goes(trained_run):
    from bevkit.bench import bench_input, bench_model
    from bevkit.config import load_experiment
    from bevkit.export import load_trained

    cfg_path, ckpt = trained_run
    cfg = load_experiment(cfg_path)
    model = load_trained(cfg, ckpt)
    batch, _ = bench_input(cfg, model, "mini_val", 1, 2, torch.device("cpu"))
    model.bev_encoder = _Slow(model.bev_encoder, 0.05)
    rep = bench_model(model, batch, repeats=3, warmup=0, flops=False)
    lat = rep["latency_ms"]
    assert rep["batch"] == 2
    assert lat["bev_encoder"]["min"] >= 50 and lat["lidar"]["median"] < 50 and lat["heads.detection"]["median"] < 50
    assert lat["forward"]["min"] >= 50 and lat["other"]["min"] >= 0
    assert lat["total"]["median"] >= lat["forward"]["median"] + lat["decode"]["min"]


def test_bench_times_history_and_camera_stages(tiny_root, tmp_path, capsys):
    # An untrained temporal camera model: its history frame is encoded in every iteration.
    args = ["bench", str(CONFIGS / "bevdet4d-synth.yaml"), "--repeats", "1", "--warmup", "0", "--no-flops",
            "--set", f"data.root={tiny_root}", "--set", "data.val_split=mini_val", "--set", f"out={tmp_path}",
            "--sample", "1"]
    assert main(args) == 0
    capsys.readouterr()
    rep = json.loads((tmp_path / "bench.json").read_text())
    lat = rep["latency_ms"]
    for stage in ("backbone", "neck", "view_transform", "temporal", "bev_encoder", "heads.detection"):
        assert lat[stage]["min"] > 0, stage
    assert lat["history"]["min"] > 0 and rep["input"]["history_frames"] == 1 and rep["flops"] is None
    # The stages are this frame's: encoding the history frame (backbone, neck, view transform again) is
    # not counted in them, so they fit inside the forward pass.
    assert lat["other"]["min"] >= 0

    # One-line errors, nothing written.
    bad = [(["--sample", "99"], "are not all in split 'mini_val'"),
           (["--repeats", "0"], "--repeats must be at least 1")]
    if not torch.cuda.is_available():
        bad += [(["--precision", "16"], "CUDA only"), (["--device", "cuda"], "no CUDA device")]
    for extra, message in bad:
        (tmp_path / "bench.json").unlink(missing_ok=True)
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "bench.json").exists()
