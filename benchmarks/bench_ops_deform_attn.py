"""Benchmark multi-scale deformable attention: fast CSR path vs the grid_sample reference.

Sizes follow BEVFormer's spatial cross-attention encoder: the 6 cameras are the batch,
4 feature levels (strides 8..64 of the input image), 8 heads of 32 channels, 4 points per
level; the queries are the BEV grid (50x50 for -tiny at 450x800 input, 200x200 for -base
at 900x1600), every query sampling every camera (BEVFormer keeps only the queries a
camera sees, roughly a third, so this is an upper bound on its work). Prints one JSON
document. Timing in this process (median wall and CPU time of interleaved repeats, one
warm-up at the smallest size);
peak memory per variant in a fresh subprocess (VmHWM growth over VmRSS before the call).

    python benchmarks/bench_ops_deform_attn.py [--sizes tiny mid base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bevkit.ops import deform_attn, deform_attn_exportable, deform_attn_reference

CAMS, HEADS, DH, POINTS = 6, 8, 32, 4
SIZES = {
    # name: (bev side, feature levels (H_l, W_l))
    "tiny": (50, [(57, 100), (29, 50), (15, 25), (8, 13)]),
    "mid": (100, [(116, 200), (58, 100), (29, 50), (15, 25)]),
    "base": (200, [(116, 200), (58, 100), (29, 50), (15, 25)]),
}
VARIANTS = {
    "reference": deform_attn_reference,
    "fast": deform_attn,
    "exportable": deform_attn_exportable,
}


def make_inputs(size: str, dtype=torch.float32):
    side, shapes = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    s = sum(h * w for h, w in shapes)
    q = side * side
    value = torch.randn(CAMS, s, HEADS, DH, generator=gen, dtype=dtype)
    # Reference points spread over the image with small learned offsets; ~10% fall off it.
    centre = torch.rand(CAMS, q, 1, 1, 1, 2, generator=gen, dtype=dtype) * 1.1 - 0.05
    offset = 0.02 * torch.randn(CAMS, q, HEADS, len(shapes), POINTS, 2, generator=gen, dtype=dtype)
    loc = centre + offset
    attn = torch.randn(CAMS, q, HEADS, len(shapes), POINTS, generator=gen, dtype=dtype)
    attn = attn.flatten(-2).softmax(-1).view_as(attn)
    return value, shapes, loc, attn


def run_once(fn, value, shapes, loc, attn, backward: bool):
    if backward:
        v, l, a = (t.detach().requires_grad_() for t in (value, loc, attn))
        fn(v, shapes, l, a).sum().backward()
    else:
        with torch.no_grad():
            fn(value, shapes, loc, attn)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(size: str, name: str, backward: bool) -> dict:
    value, shapes, loc, attn = make_inputs(size)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    t0 = time.perf_counter()
    run_once(VARIANTS[name], value, shapes, loc, attn, backward)
    return {"peak_delta_mib": (_rss_kib("VmHWM") - before) / 1024, "cold_ms": 1e3 * (time.perf_counter() - t0)}


def accuracy() -> dict:
    value, shapes, loc, attn = make_inputs("tiny", torch.float64)
    inputs64 = [t.detach().requires_grad_() for t in (value, loc, attn)]
    ref = deform_attn_reference(inputs64[0], shapes, inputs64[1], inputs64[2])
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs64, grad)
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731
    result = {}
    # The float32 reference is listed too: location gradients jump where float32 rounding moves
    # a sample across a pixel centre, for any float32 implementation.
    for name in ("fast", "reference"):
        inputs32 = [t.detach().float().requires_grad_() for t in (value, loc, attn)]
        out = VARIANTS[name](inputs32[0], shapes, inputs32[1], inputs32[2])
        grads = torch.autograd.grad(out, inputs32, grad.float())
        result[f"{name}_float32"] = {"out": rel(out, ref), "grad_value": rel(grads[0], ref_grads[0]),
                                     "grad_loc": rel(grads[1], ref_grads[1]), "grad_attn": rel(grads[2], ref_grads[2])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid", "base"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, name, mode = args.child.split(":")
        print(json.dumps(memory_child(size, name, mode == "fwd_bwd")))
        return
    load_before = os.getloadavg()
    timing, memory, ratios = {}, {}, {}
    for size in args.sizes:
        value, shapes, loc, attn = make_inputs(size)
        reps = args.repeats if size == "tiny" else 1
        jobs = {}
        for name, fn in VARIANTS.items():
            for backward in (False, True):
                if name == "exportable" and backward and size != "tiny":
                    continue  # the exportable path is for inference graphs
                jobs[f"{size}/{name}/{'fwd_bwd' if backward else 'fwd'}"] = (
                    lambda fn=fn, backward=backward, inputs=(value, shapes, loc, attn): run_once(fn, *inputs, backward))
        if size == "tiny":
            for fn in jobs.values():
                fn()  # warm-up
        wall = {k: [] for k in jobs}
        cpu = {k: [] for k in jobs}
        for _ in range(reps):  # interleaved, so load from other processes hits all variants alike
            for key, fn in jobs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[key].append(time.perf_counter() - w0)
                cpu[key].append(time.process_time() - c0)
        for key in jobs:
            timing[key] = {"median_ms": 1e3 * sorted(wall[key])[reps // 2], "min_ms": 1e3 * min(wall[key]),
                           "cpu_median_ms": 1e3 * sorted(cpu[key])[reps // 2], "repeats": reps}
        del value, loc, attn, jobs  # the inputs, also held by the jobs, are freed before the memory runs
        for name in VARIANTS:
            for mode in ("fwd", "fwd_bwd"):
                if name == "exportable" and mode == "fwd_bwd" and size != "tiny":
                    continue
                cmd = [sys.executable, __file__, "--child", f"{size}:{name}:{mode}"]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                memory[f"{size}/{name}/{mode}"] = json.loads(res.stdout.strip().splitlines()[-1])
        for mode in ("fwd", "fwd_bwd"):
            ref_t = timing[f"{size}/reference/{mode}"]["median_ms"]
            ratios[f"{size}/{mode}/speedup_fast_over_reference"] = ref_t / timing[f"{size}/fast/{mode}"]["median_ms"]
            ratios[f"{size}/{mode}/cpu_time_speedup"] = (timing[f"{size}/reference/{mode}"]["cpu_median_ms"]
                                                        / timing[f"{size}/fast/{mode}"]["cpu_median_ms"])
            ratios[f"{size}/{mode}/memory_fast_over_reference"] = (
                memory[f"{size}/fast/{mode}"]["peak_delta_mib"] / memory[f"{size}/reference/{mode}"]["peak_delta_mib"])
    print(json.dumps({
        "benchmark": "deform_attn",
        "command": "python benchmarks/bench_ops_deform_attn.py " + " ".join(sys.argv[1:]),
        "sizes": {k: {"queries": SIZES[k][0] ** 2, "levels": SIZES[k][1], "cams": CAMS, "heads": HEADS,
                      "head_dim": DH, "points": POINTS} for k in args.sizes},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "accuracy_float32_vs_float64_reference": accuracy(),
        "timing_ms": timing, "peak_memory": memory, "ratios": ratios,
    }, indent=1))


if __name__ == "__main__":
    main()
