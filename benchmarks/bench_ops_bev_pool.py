"""Benchmark lift-splat pooling at BEVDet-R50 size: fast CSR path vs index_add and cumsum baselines.

Prints one JSON document. Every timing counts the geometry preparation (frustum points
to cell indices, plus the CSR plan for the fast path), because under augmentation the
geometry changes every step. Default-allocator timing runs in this process: median wall (and
CPU) time of repeats, the variants interleaved so that load from other processes hits all
alike; peak
memory runs each variant in fresh subprocesses (median of ``--memory-runs``) and reports the
growth of the resident set (VmHWM after resetting it, minus VmRSS before the call), and, in one
more fresh process, the peak bytes of live tensors during the call from the profiler's allocation
events (what ``torch.cuda.max_memory_allocated`` reports on a GPU; deterministic, where the
resident-set growth of a small call depends on the heap the process starts with). The timing is
repeated with a glibc that keeps freed memory (mmap disabled, no trimming, 1 GiB top pad),
which removes the page-fault cost of fresh large allocations; there each variant runs alone
in a fresh process (warm-up, then repeats).

    python benchmarks/bench_ops_bev_pool.py [--batches 1 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bevkit.ops import (
    BEVGridSpec,
    bev_cell_index,
    bev_pool,
    bev_pool_cumsum,
    bev_pool_exportable,
    bev_pool_plan,
    bev_pool_reference,
)

CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
# BEVDet-R50: 256x704 input (1600x900 resized by 0.44, top 140 rows cropped), stride 16.
N, D, H, W, C = 6, 59, 16, 44, 80
GRID = BEVGridSpec(xbound=(-51.2, 51.2, 0.8), ybound=(-51.2, 51.2, 0.8), zbound=(-5.0, 3.0, 8.0))
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(1 << 30)}


def _quat_to_matrix(q):
    w, x, y, z = q
    return torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ], dtype=torch.float64)


def rig_frustum(batch: int) -> torch.Tensor:
    """(B, N, D, H, W, 3) ego-frame frustum of the nuScenes rig; sample k jitters depth and yaw."""
    import bevkit

    rig = json.loads((Path(bevkit.__file__).parent / "data" / "synth" / "nuscenes_rig.json").read_text())
    u = torch.linspace(0, 703, W, dtype=torch.float64).view(1, 1, W).expand(D, H, W)
    v = torch.linspace(0, 255, H, dtype=torch.float64).view(1, H, 1).expand(D, H, W)
    depth = torch.arange(1.0, 60.0, dtype=torch.float64).view(D, 1, 1).expand(D, H, W)
    samples = []
    for k in range(batch):
        yaw = 0.1 * k  # a different BEV augmentation per sample
        rot_z = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]],
                             dtype=torch.float64)
        cams = []
        for name in CAMERAS:
            sensor = rig["sensors"][name]
            intrinsics = torch.tensor(sensor["camera_intrinsic"], dtype=torch.float64)
            pix = torch.stack((u / 0.44 * depth, (v + 140) / 0.44 * depth, depth), dim=-1)
            xyz_cam = pix @ torch.linalg.inv(intrinsics).T
            xyz_ego = xyz_cam @ _quat_to_matrix(sensor["rotation"]).T + torch.tensor(sensor["translation"])
            cams.append(xyz_ego @ rot_z.T)
        samples.append(torch.stack(cams))
    return torch.stack(samples).float().contiguous()


def make_inputs(batch: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    points = rig_frustum(batch)
    depth = torch.randn(batch, N, D, H, W, generator=gen).softmax(2).to(dtype)
    feats = torch.randn(batch, N, C, H, W, generator=gen).to(dtype)
    return points.to(dtype), depth, feats


def variants(points):
    return {
        "fast": lambda d, f: bev_pool(d, f, bev_pool_plan(points, GRID)),
        "index_add": lambda d, f: bev_pool_reference(d, f, points, GRID),
        "cumsum": lambda d, f: bev_pool_cumsum(d, f, points, GRID),
        "exportable": lambda d, f: bev_pool_exportable(d, f, bev_cell_index(points, GRID), GRID),
    }


def run_once(fn, depth, feats, backward: bool):
    if backward:
        d, f = depth.detach().requires_grad_(), feats.detach().requires_grad_()
        fn(d, f).sum().backward()
    else:
        with torch.no_grad():
            fn(depth, feats)


def time_jobs(jobs: dict, repeats: int) -> dict:
    """Median wall and CPU time per job; jobs are interleaved so load swings hit all of them."""
    for fn in jobs.values():
        fn()  # warm-up
    wall = {k: [] for k in jobs}
    cpu = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
    return {k: {"median_ms": med(wall[k]), "min_ms": 1e3 * min(wall[k]), "cpu_median_ms": med(cpu[k])}
            for k in jobs}


def timing_block(batches, repeats):
    out = {}
    for batch in batches:
        points, depth, feats = make_inputs(batch)
        jobs = {}
        for name, fn in variants(points).items():
            for backward in (False, True):
                jobs[f"b{batch}/{name}/{'fwd_bwd' if backward else 'fwd'}"] = (
                    lambda fn=fn, backward=backward: run_once(fn, depth, feats, backward))
        # The pooling alone with a reused plan (fixed calibration), for the bandwidth ratio.
        plan = bev_pool_plan(points, GRID)
        jobs[f"b{batch}/fast_plan_reused/fwd"] = lambda: run_once(
            lambda d, f: bev_pool(d, f, plan), depth, feats, False)
        jobs[f"b{batch}/plan_only"] = lambda: bev_pool_plan(points, GRID)
        out.update(time_jobs(jobs, repeats))
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(batch: int, name: str, backward: bool) -> dict:
    points, depth, feats = make_inputs(batch)
    fn = variants(points)[name]
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    run_once(fn, depth, feats, backward)
    return {"peak_delta_mib": (_rss_kib("VmHWM") - before) / 1024}


def live_child(batch: int, name: str, backward: bool) -> dict:
    """Peak bytes of live tensors during one call, from the profiler's allocation events.

    What ``torch.cuda.max_memory_allocated`` reports on a GPU: every tensor allocated and freed
    inside the call, summed in order, without the C allocator's reuse or page faulting.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    points, depth, feats = make_inputs(batch)
    fn = variants(points)[name]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(fn, depth, feats, backward)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    deltas = [e["args"]["Bytes"] for e in sorted((e for e in events if e.get("name") == "[memory]"),
                                                 key=lambda e: e["args"]["Ev Idx"])]
    live = peak = 0
    for delta in deltas:
        live += delta
        peak = max(peak, live)
    return {"peak_live_mib": peak / 2**20}


def copy_bandwidth_gbs() -> float:
    src = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9  # read + write


def accuracy(batch: int) -> dict:
    points, depth, feats = make_inputs(batch, torch.float64)
    points = points.float()  # both paths bin the same float32 points: only the sums differ
    ref = bev_pool_reference(depth, feats, points, GRID)
    fast = bev_pool(depth.float(), feats.float(), bev_pool_plan(points, GRID)).double()
    return {"max_abs_err": float((fast - ref).abs().max()),
            "rel_err_vs_max": float((fast - ref).abs().max() / ref.abs().max())}


def isolated_timing(batch: int, name: str, backward: bool, repeats: int) -> dict:
    """One variant alone in this (fresh) process: warm-up, then repeats."""
    points, depth, feats = make_inputs(batch)
    if name == "plan_only":
        job = lambda: bev_pool_plan(points, GRID)  # noqa: E731
    else:
        job = lambda: run_once(variants(points)[name], depth, feats, backward)  # noqa: E731
    return time_jobs({"t": job}, repeats)["t"]


def _child(args) -> None:
    if args.child.startswith("time:"):
        _, batch, name, mode = args.child.split(":")
        print(json.dumps(isolated_timing(int(batch), name, mode == "fwd_bwd", args.repeats)))
    elif args.child.startswith("live:"):
        _, batch, name, mode = args.child.split(":")
        print(json.dumps(live_child(int(batch), name, mode == "fwd_bwd")))
    else:
        batch, name, mode = args.child.split(":")
        print(json.dumps(memory_child(int(batch), name, mode == "fwd_bwd")))


def _spawn(child: str, args, env=None) -> dict:
    cmd = [sys.executable, __file__, "--child", child, "--repeats", str(args.repeats), "--batches",
           *map(str, args.batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per peak-memory figure")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    load_before = os.getloadavg()
    bandwidth = copy_bandwidth_gbs()
    timing = {"default_malloc": timing_block(args.batches, args.repeats), "keep_freed_malloc": {}}
    # With freed memory kept, each variant runs alone in a fresh process: interleaving them in
    # one no-mmap, never-trimmed glibc heap made every variant (naive ones too) 5-40x slower.
    for batch in args.batches:
        for name in ("fast", "index_add", "cumsum", "exportable"):
            for mode in ("fwd", "fwd_bwd"):
                timing["keep_freed_malloc"][f"b{batch}/{name}/{mode}"] = _spawn(
                    f"time:{batch}:{name}:{mode}", args, KEEP_FREED)
    memory = {}
    for batch in args.batches:
        for name in ("fast", "index_add", "cumsum", "exportable"):
            for mode in ("fwd", "fwd_bwd"):
                # The growth of a small call varies with the heap a fresh process starts with
                # (e.g. 6-7 or 15 MiB for the batch-1 fast forward), so take the median of runs.
                runs = sorted(_spawn(f"{batch}:{name}:{mode}", args)["peak_delta_mib"]
                              for _ in range(args.memory_runs))
                live = _spawn(f"live:{batch}:{name}:{mode}", args)["peak_live_mib"]
                memory[f"b{batch}/{name}/{mode}"] = {"peak_delta_mib": runs[len(runs) // 2], "runs_mib": runs,
                                                     "peak_live_mib": live}
    ratios = {}
    for alloc, block in timing.items():
        for batch in args.batches:
            for mode in ("fwd", "fwd_bwd"):
                fast = block[f"b{batch}/fast/{mode}"]["median_ms"]
                for base in ("index_add", "cumsum", "exportable"):
                    ratios[f"{alloc}/b{batch}/{mode}/{base}_over_fast"] = block[f"b{batch}/{base}/{mode}"]["median_ms"] / fast
    for batch in args.batches:
        for mode in ("fwd", "fwd_bwd"):
            fast = memory[f"b{batch}/fast/{mode}"]["peak_delta_mib"]
            ratios[f"memory/b{batch}/{mode}/fast_over_index_add"] = fast / memory[f"b{batch}/index_add/{mode}"]["peak_delta_mib"]
            live = {name: memory[f"b{batch}/{name}/{mode}"]["peak_live_mib"] for name in ("fast", "index_add")}
            ratios[f"memory_live/b{batch}/{mode}/fast_over_index_add"] = live["fast"] / live["index_add"]
    roofline = {}
    for batch in args.batches:
        elems = batch * N * D * H * W
        pool_bytes = 4 * (elems + batch * N * C * H * W + batch * C * GRID.ny * GRID.nx)  # depth, feats, out
        plan_bytes = 4 * 3 * elems  # frustum points
        bound_pool_ms = pool_bytes / (bandwidth * 1e9) * 1e3
        bound_all_ms = (pool_bytes + plan_bytes) / (bandwidth * 1e9) * 1e3
        block = timing["default_malloc"]
        roofline[f"b{batch}"] = {
            "bytes_pool": pool_bytes, "bytes_with_geometry": pool_bytes + plan_bytes,
            "bound_pool_ms": bound_pool_ms, "bound_with_geometry_ms": bound_all_ms,
            "pool_plan_reused_over_bound": block[f"b{batch}/fast_plan_reused/fwd"]["median_ms"] / bound_pool_ms,
            "fwd_with_plan_over_bound": block[f"b{batch}/fast/fwd"]["median_ms"] / bound_all_ms,
        }
    print(json.dumps({
        "benchmark": "bev_pool",
        "command": "python benchmarks/bench_ops_bev_pool.py " + " ".join(sys.argv[1:]),
        "sizes": {"N": N, "D": D, "H": H, "W": W, "C": C, "Y": GRID.ny, "X": GRID.nx, "batches": args.batches},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "copy_bandwidth_GBps": bandwidth},
        "keep_freed_env": KEEP_FREED,
        "accuracy_float32_vs_float64_reference": {f"b{b}": accuracy(b) for b in args.batches},
        "timing_ms": timing, "peak_memory": memory, "ratios": ratios, "bandwidth": roofline,
    }, indent=1))


if __name__ == "__main__":
    main()
