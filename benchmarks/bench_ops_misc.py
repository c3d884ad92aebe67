"""Benchmark voxelisation, pillar scatter, BEV warping, NMS and sparse 3D convolution: fast path vs reference.

Prints one JSON document; each figure is the median of repeats in this process, and
each ratio is reference time / fast time measured in the same run.

    python benchmarks/bench_ops_misc.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from bevkit.ops import (
    BEVGridSpec,
    SparseVoxels,
    bev_warp,
    bev_warp_reference,
    circle_nms,
    circle_nms_reference,
    nms_rotated,
    nms_rotated_reference,
    pillar_scatter,
    pillar_scatter_reference,
    sparse_conv3d,
    sparse_conv3d_reference,
    voxelize,
    voxelize_batch,
    voxelize_reference,
)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def lidar_sweep(n=34000, seed=0):
    """A 32-beam-like sweep: ranges 1..80 m, elevations -30..10 deg, intensity."""
    gen = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=gen) * 2 * math.pi
    el = torch.deg2rad(torch.linspace(-30.67, 10.67, 32))[torch.randint(0, 32, (n,), generator=gen)]
    rng = 1 + 79 * torch.rand(n, generator=gen) ** 2
    xyz = torch.stack((rng * torch.cos(el) * torch.cos(az), rng * torch.cos(el) * torch.sin(az),
                       1.84 + rng * torch.sin(el)), dim=1)
    return torch.cat((xyz, torch.rand(n, 1, generator=gen)), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reps = args.repeats
    load_before = os.getloadavg()
    res = {}

    # PointPillars settings: 0.2 m pillars over +-51.2 m, 20 points, 30000 pillars.
    pts = lidar_sweep()
    vs, pr = (0.2, 0.2, 8.0), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    fast = voxelize(pts, vs, pr, 20, 30000)
    ref = voxelize_reference(pts, vs, pr, 20, 30000)
    same = all(torch.equal(getattr(fast, k), getattr(ref, k)) for k in ("features", "coords", "num_points"))
    res["voxelize"] = {"points": pts.shape[0], "voxels": int(fast.coords.shape[0]), "identical": same,
                       "fast_ms": timed(lambda: voxelize(pts, vs, pr, 20, 30000), reps),
                       "reference_ms": timed(lambda: voxelize_reference(pts, vs, pr, 20, 30000), 1)}

    vox = voxelize_batch([lidar_sweep(seed=s) for s in range(4)], vs, pr, 20, 30000)
    feats = torch.randn(vox.coords.shape[0], 64)
    res["pillar_scatter"] = {"pillars": feats.shape[0], "batch": 4, "channels": 64, "grid": [512, 512],
                             "fast_ms": timed(lambda: pillar_scatter(feats, vox.coords, 4, (512, 512)), reps),
                             "reference_ms": timed(lambda: pillar_scatter_reference(feats, vox.coords, 4, (512, 512)), 1)}

    grid = BEVGridSpec(xbound=(-51.2, 51.2, 0.8), ybound=(-51.2, 51.2, 0.8), zbound=(-5.0, 3.0, 8.0))
    bev = torch.randn(4, 80, 128, 128)
    motion = torch.eye(4).repeat(4, 1, 1)
    for k in range(4):
        yaw = 0.05 * k
        motion[k, :2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        motion[k, 0, 3] = -2.0 * k

    def fwd_bwd(fn):
        x = bev.clone().requires_grad_()
        fn(x, motion, grid).sum().backward()

    err = (bev_warp(bev, motion, grid) - bev_warp_reference(bev, motion, grid)).abs().max()
    res["bev_warp"] = {"shape": list(bev.shape), "max_abs_diff": float(err),
                       "fast_fwd_ms": timed(lambda: bev_warp(bev, motion, grid), reps),
                       "reference_fwd_ms": timed(lambda: bev_warp_reference(bev, motion, grid), reps),
                       "fast_fwd_bwd_ms": timed(lambda: fwd_bwd(bev_warp), reps),
                       "reference_fwd_bwd_ms": timed(lambda: fwd_bwd(bev_warp_reference), reps)}

    gen = torch.Generator().manual_seed(0)
    n = 1000  # a decoder's pre-NMS candidates for a batch of 2, 10 classes
    boxes = torch.rand(n, 5, generator=gen) * torch.tensor([100.0, 100.0, 4.0, 2.0, 6.28])
    boxes[:, :2] -= 50
    boxes[:, 2:4] += 0.5
    scores = torch.rand(n, generator=gen)
    groups = torch.randint(0, 20, (n,), generator=gen)
    fast_keep = nms_rotated(boxes, scores, 0.2, groups)
    res["nms_rotated"] = {"boxes": n, "groups": 20, "kept": int(fast_keep.numel()),
                          "identical": bool(torch.equal(fast_keep, nms_rotated_reference(boxes, scores, 0.2, groups))),
                          "fast_ms": timed(lambda: nms_rotated(boxes, scores, 0.2, groups), reps),
                          "reference_ms": timed(lambda: nms_rotated_reference(boxes, scores, 0.2, groups), 1)}
    centres = boxes[:, :2].contiguous()
    c_keep = circle_nms(centres, scores, 2.0, groups)
    res["circle_nms"] = {"boxes": n, "kept": int(c_keep.numel()),
                         "identical": bool(torch.equal(c_keep, circle_nms_reference(centres, scores, 2.0, groups))),
                         "fast_ms": timed(lambda: circle_nms(centres, scores, 2.0, groups), reps),
                         "reference_ms": timed(lambda: circle_nms_reference(centres, scores, 2.0, groups), 1)}
    # Sparse 3D convolution at a BEVFusion-like voxel size (0.1 x 0.1 x 0.2 m over +-12.8 m, z in
    # [-5, 3]: a (41, 256, 256) grid, which the dense reference can still hold), 16 channels, batch 2.
    vs3, pr3 = (0.1, 0.1, 0.2), (-12.8, -12.8, -5.0, 12.8, 12.8, 3.0)
    vox3 = voxelize_batch([lidar_sweep(seed=s) for s in range(2)], vs3, pr3, 10, 200000)
    mean3 = vox3.features.sum(1) / vox3.num_points.clamp(min=1).unsqueeze(1)
    feats3 = torch.cat([mean3, torch.randn(len(mean3), 12, generator=torch.Generator().manual_seed(1))], 1)
    sv = SparseVoxels.from_voxels(feats3, vox3.coords, (41, 256, 256), 2)
    for name, kw, cout in (("sparse_conv_subm", {"subm": True}, 16), ("sparse_conv_stride2", {"stride": 2, "padding": 1}, 32)):
        w = torch.randn(3, 3, 3, 16, cout) * 0.05

        def run(fn, grad, w=w, kw=kw):
            x = sv.replace(sv.features.clone().requires_grad_(grad))
            wg = w.clone().requires_grad_(grad)
            out = fn(SparseVoxels(x.features, x.coords, x.shape, x.batch_size), wg, None, **kw).features
            if grad:
                out.sum().backward()
            return out

        diff = float((run(sparse_conv3d, False) - run(sparse_conv3d_reference, False)).abs().max())
        res[name] = {"voxels": len(sv.coords), "grid": [41, 256, 256], "batch": 2, "channels": [16, cout],
                     "max_abs_diff": diff,
                     "fast_fwd_ms": timed(lambda: run(sparse_conv3d, False), reps),
                     "reference_fwd_ms": timed(lambda: run(sparse_conv3d_reference, False), 1),
                     "fast_fwd_bwd_ms": timed(lambda: run(sparse_conv3d, True), reps),
                     "reference_fwd_bwd_ms": timed(lambda: run(sparse_conv3d_reference, True), 1)}
    ratios = {}
    for key, r in res.items():
        if "fast_ms" in r:
            ratios[f"{key}/speedup"] = r["reference_ms"] / r["fast_ms"]
        else:
            ratios[f"{key}/fwd_speedup"] = r["reference_fwd_ms"] / r["fast_fwd_ms"]
            ratios[f"{key}/fwd_bwd_speedup"] = r["reference_fwd_bwd_ms"] / r["fast_fwd_bwd_ms"]
    print(json.dumps({
        "benchmark": "ops_misc",
        "command": "python benchmarks/bench_ops_misc.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "results": res, "ratios": ratios,
    }, indent=1))


if __name__ == "__main__":
    main()
