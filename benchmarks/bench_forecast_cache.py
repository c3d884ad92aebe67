"""Forecaster training from the BEV feature cache against computing the features on the fly.

Each variant runs in its own process (so its peak resident memory is its own) for the same number
of steps on the same agents: ``cache`` reads memory-mapped features and never builds the BEV model;
``on_the_fly`` loads the BEV model from its checkpoint and runs it (history frames included) for
every sample of every batch. Prints JSON: seconds per step, peak RSS, and the ratios.

    python benchmarks/bench_forecast_cache.py --config CONFIG --ckpt CKPT --cache DIR [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args) -> dict:
    import torch

    from bevkit.config import load_experiment
    from bevkit.forecast.model import Forecaster
    from bevkit.forecast.run import CachedFeatureMap, _dataset, grid_bounds
    from bevkit.forecast.train import collate_forecast

    torch.manual_seed(0)
    cfg = load_experiment(args.config, args.set or [])
    cached = CachedFeatureMap(args.cache, cfg)  # the agents and split are the cache's in both variants
    if args.variant == "cache":
        features = cached
    else:
        from bevkit.engine.checkpoint import model_state, read_checkpoint
        from bevkit.engine.data import BEVDataModule
        from bevkit.engine.module import BEVLitModule
        from bevkit.forecast.train import EncoderFeatures

        module = BEVLitModule(cfg)
        module.model.load_state_dict(model_state(read_checkpoint(args.ckpt)))
        module.eval()
        features = EncoderFeatures(module, BEVDataModule(cfg).dataset(cached.split, train=False))
    ds = _dataset(cfg, features, cached.split, 4, 12)
    model = Forecaster(modes=10, bev_channels=int(cached.cached.shape[0]), bounds=grid_bounds(cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), collate_fn=collate_forecast)
    with torch.no_grad():
        model(collate_forecast([ds[0]]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, steps = [], 0
    while steps < args.steps:
        it = iter(loader)
        while steps < args.steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)  # reading (or computing) the features is part of the step
            except StopIteration:
                break
            loss = model.loss(model(batch), batch["future"])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            steps += 1
    warm = times[2:] or times
    return {"variant": args.variant, "steps": steps, "seconds_per_step": sum(warm) / len(warm),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bev_model_in_memory": args.variant != "cache"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--cache", required=True, help="a finished cache of the split to train on")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append")
    p.add_argument("--variant", choices=("cache", "on_the_fly"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("cache", "on_the_fly"):
        cmd = [sys.executable, __file__, "--variant", variant, "--config", args.config, "--ckpt", args.ckpt,
               "--cache", args.cache, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)] + [a for s in (args.set or []) for a in ("--set", s)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    c, f = results["cache"], results["on_the_fly"]
    results["speedup"] = f["seconds_per_step"] / c["seconds_per_step"]
    results["memory_ratio"] = f["peak_rss_mb"] / c["peak_rss_mb"]
    results["command"] = " ".join(["python", "benchmarks/bench_forecast_cache.py"] + sys.argv[1:])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
