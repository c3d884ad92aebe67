"""Every preset through ``bevkit.export.export_onnx``: does it export, how close is onnxruntime to PyTorch.

Each preset is built with its initial weights (seed 0; no checkpoint is needed to test the
graph) and exported on sample 0 of the dataset's val split, in its own process so that its peak
memory is its own. Prints one JSON document: per preset the export time, the file size, the
largest relative difference of any output over two samples, onnxruntime's and PyTorch's latency
(median of three, this machine's threads), the peak resident set of the process, or the reason
it was refused. The decoded boxes are compared too, but with initial weights they say little:
scores are near-equal, so circle NMS may keep either of two neighbours (``bevkit export`` on a
trained checkpoint is the check that counts).

    python benchmarks/export_presets.py --data data/synth-mini [--presets bevdet-synth ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bevkit.atomic import write_text_atomic

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def one(preset: str, data: str) -> dict:
    """Export one preset (runs in a child process)."""
    import torch

    from bevkit.config import ConfigError, load_experiment
    from bevkit.engine.checkpoint import build_experiment_model
    from bevkit.export import export_onnx

    cfg = load_experiment(CONFIGS / f"{preset}.yaml", [f"data.root={data}", "data.train_split=mini_train",
                                                      "data.val_split=mini_val", "data.workers=0"])
    torch.manual_seed(0)
    model = build_experiment_model(cfg, load_checkpoint=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rep = export_onnx(cfg, model, Path(tmp) / f"{preset}.onnx")
        except ConfigError as e:
            return {"preset": preset, "exported": False, "reason": str(e)}
    first = rep["parity"]["per_sample"][0]
    return {"preset": preset, "exported": True, "seconds_total": time.perf_counter() - t0,
            "export_s": rep["export_s"], "MiB": rep["bytes"] / 2**20,
            "inputs": {i["name"]: i["shape"] for i in rep["inputs"]},
            "max_rel_diff": rep["parity"]["max_rel_diff"], "samples": rep["parity"]["samples"],
            "onnxruntime_ms": 1e3 * first["onnxruntime_s"], "torch_ms": 1e3 * first["torch_s"],
            "decoded": [c.get("decoded") for c in rep["parity"]["per_sample"]],
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a nuScenes-format dataset with mini_train / mini_val splits")
    ap.add_argument("--presets", nargs="+", default=sorted(p.stem for p in CONFIGS.glob("*-synth.yaml")))
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.data)))
        return
    results = []
    for preset in args.presets:
        if not (CONFIGS / f"{preset}.yaml").is_file():
            ap.error(f"no preset {preset!r} in {CONFIGS}")
        proc = subprocess.run([sys.executable, __file__, "--data", args.data, "--child", preset],
                              capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            results.append({"preset": preset, "exported": False,
                            "reason": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
        else:
            results.append(json.loads(lines[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    doc = json.dumps({"benchmark": "export_presets", "data": args.data, "results": results}, indent=1)
    if args.out is not None:
        write_text_atomic(args.out, doc)
    print(doc)


if __name__ == "__main__":
    main()
