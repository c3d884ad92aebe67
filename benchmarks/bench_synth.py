"""Time `bevkit synth` for a preset and report the size on disk, as JSON.

    python benchmarks/bench_synth.py --preset tiny
    python benchmarks/bench_synth.py --preset mini --workers 2
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from bevkit.data.synth import generate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write here (and keep) instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / args.preset
        t0 = time.perf_counter()
        c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = generate(out, preset=args.preset, workers=args.workers, scale=args.scale, progress=False)
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(c0, c1))
        by_kind = {}
        for f in Path(out).rglob("*"):
            if f.is_file():
                kind = f.suffix if f.suffix != ".bin" else ".pcd.bin"
                by_kind[kind] = by_kind.get(kind, 0) + f.stat().st_size
    print(json.dumps({
        "benchmark": "synth", "preset": args.preset, "workers": summary["workers"], "cpus": os.cpu_count(),
        "machine": platform.machine(), "scale": summary["scale"], "scenes": summary["scenes"],
        "samples": summary["samples"], "annotations": summary["annotations"], "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1), "load_average": os.getloadavg(),
        "seconds_per_sample": round(wall / summary["samples"], 3), "bytes": summary["bytes"],
        "megabytes": round(summary["bytes"] / 2**20, 1), "bytes_by_kind": by_kind,
    }, indent=1))


if __name__ == "__main__":
    main()
