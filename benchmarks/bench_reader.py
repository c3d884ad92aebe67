"""Reader speed, as JSON: building our index against the devkit's NuScenes(...) constructor on the
same data in one run, and DataLoader throughput at the default training resolution.

    python benchmarks/bench_reader.py data/synth-mini --workers 2
"""

import argparse
import json
import tempfile
import time

import torch

from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.data.nuscenes import NuScenesIndex, find_version


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--version", default=None)
    ap.add_argument("--split", default="mini_train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    version = args.version or find_version(args.root)
    out = {"benchmark": "reader", "root": str(args.root), "version": version}
    with tempfile.TemporaryDirectory() as cache:
        out["index_build_s"] = best_of(lambda: NuScenesIndex.load(args.root, version, cache_dir=cache, rebuild=True),
                                       args.repeat)
        out["index_cached_load_s"] = best_of(lambda: NuScenesIndex.load(args.root, version, cache_dir=cache),
                                             args.repeat)
        # Sample dicts are made from the index's arrays when first asked for: what all of them cost.
        out["index_all_sample_dicts_s"] = best_of(
            lambda: list(NuScenesIndex.load(args.root, version, cache_dir=cache).samples), args.repeat) \
            - out["index_cached_load_s"]
        try:
            from nuscenes import NuScenes

            out["devkit_constructor_s"] = best_of(lambda: NuScenes(version, str(args.root), verbose=False),
                                                  args.repeat)
            out["build_speedup_vs_devkit"] = out["devkit_constructor_s"] / out["index_build_s"]
            out["cached_speedup_vs_devkit"] = out["devkit_constructor_s"] / out["index_cached_load_s"]
        except ImportError:
            out["devkit_constructor_s"] = None
        index = NuScenesIndex.load(args.root, version, cache_dir=cache)
    cfg = DataConfig(image_size=(256, 704))
    ds = NuScenesDataset(args.root, args.split, cfg, index=index)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=args.workers,
                                         collate_fn=collate, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # workers started, first batch out of the way
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        batch = next(it)
        n += len(batch["token"])
    dt = time.perf_counter() - t0
    out.update({"loader_workers": args.workers, "loader_image_size": [256, 704], "loader_cameras": 6,
                "loader_points": "keyframe", "loader_samples_per_s": n / dt})
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
