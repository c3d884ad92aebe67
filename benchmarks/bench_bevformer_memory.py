"""Peak memory of one training step of the BEVFormer encoder: the sparse fast path against grid_sample.

The encoder (``bevkit.models.bevformer.BEVFormerEncoder``: temporal self-attention + spatial
cross-attention + FFN per layer) is built with a preset's settings (default ``bevformer-small``:
3 layers, 256 channels, 8 heads, 4 pillar heights x 2 points, 4 temporal points; one feature map of
720x1280 images at the preset's neck stride, or ``--stride``) on square BEV grids over +-51.2 m, once with each deformable attention
implementation (``view_transform.deform_attn``: ``fast``, the CSR path of ``ops.deform_attn``;
``reference``, one ``grid_sample`` per level of ``ops.deform_attn_reference``). One training step
is a forward with a previous BEV (temporal self-attention over two maps, as in training after the
first frame), ``out.square().mean()`` as a stand-in loss, and the backward to the parameters and the
image features (six cameras, batch 1, nuScenes rig calibration, float32, one thread).

Each (grid, implementation) runs in its own process; peak memory is the resident-set high-water
mark (``VmHWM``, reset via ``/proc/self/clear_refs`` just before the step) minus the resident set
just before it. A child past ``--max-rss-gb`` or ``--timeout`` is stopped and reported. The
report also gives, per size, the analytic bytes of the tensors that dominate each path (see
``dominant_bytes``) and a linear fit of step memory against the number of BEV queries, which
extrapolates sizes that were not run. ``--breakdown`` adds, per run, the tensors the forward saves for
the backward (``torch.autograd.graph.saved_tensors_hooks``, one extra forward after the measured step),
grouped by shape.

    python benchmarks/bench_bevformer_memory.py --sides 50 100 150 200 --impls fast reference --markdown
    python benchmarks/bench_bevformer_memory.py --sides 100 --impls fast reference --breakdown --markdown
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from procmem import GIB, reset_peak, run_watched, status_kib

from bevkit.atomic import write_text_atomic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXTENT = 51.2  # metres either side of the ego, as BEVFormer's grids


def _grid(side: int):
    from bevkit.models.config import GridConfig

    step = 2 * EXTENT / side
    return GridConfig(xbound=(-EXTENT, EXTENT, step), ybound=(-EXTENT, EXTENT, step), zbound=(-5.0, 3.0, 8.0))


def setup(preset: str, side: int, impl: str, stride: int | None = None):
    """The encoder at a ``side`` x ``side`` grid and one batch of its inputs.

    Shapes:
        returns: encoder, feats (1, 6, C_in, H/s, W/s), intrinsics / img_aug (1, 6, 3, 3),
                 ego_from_cam (1, 6, 4, 4), prev_bev (1, 1, C, Y, X), curr_from_prev (1, 1, 4, 4)
    """
    from bevkit.config import load_experiment
    from bevkit.data.augment import ImageAugConfig, image_aug_matrix
    from bevkit.data.synth.rig import load_rig
    from bevkit.models.bevformer import BEVFormerEncoder
    from bevkit.models.build import DEFORM_ATTN, build_model

    exp = load_experiment(CONFIGS / f"{preset}.yaml")
    vt = exp.model.view_transform
    with torch.device("meta"):  # the preset's neck: its channels and stride, without weights
        neck = build_model(exp.model, load_checkpoint=False).neck
    stride = stride or neck.stride
    torch.manual_seed(0)
    enc = BEVFormerEncoder(neck.channels, vt.channels, _grid(side), stride, vt.layers, vt.heads, vt.num_z,
                           vt.points_per_z, vt.tsa_points, vt.ffn, DEFORM_ATTN[impl])
    with torch.no_grad():  # non-zero offsets, so samples spread around their reference points
        for layer in enc.layers:
            for attn in (layer.tsa, layer.sca):
                attn.offsets.weight.normal_(0.0, 0.02)
    h, w = exp.data.image_size
    rig = load_rig(scale=1.0)
    cams = [rig.camera(ch) for ch in exp.data.cameras]
    aug = [image_aug_matrix((c.height, c.width), ImageAugConfig(final_size=(h, w)), None) for c in cams]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, len(cams), neck.channels, -(-h // stride), -(-w // stride), generator=gen)
    intr = torch.tensor(np.stack([c.intrinsics for c in cams]), dtype=torch.float32)[None]
    img_aug = torch.tensor(np.stack(aug), dtype=torch.float32)[None]
    ego_from_cam = torch.tensor(np.stack([c.ego_from_cam for c in cams]), dtype=torch.float32)[None]
    prev = torch.randn(1, 1, vt.channels, side, side, generator=gen)
    motion = torch.eye(4).view(1, 1, 4, 4).clone()
    motion[0, 0, 0, 3] = -1.0  # the previous frame one metre behind
    return enc, feats.requires_grad_(), intr, img_aug, ego_from_cam, prev, motion


def dominant_bytes(preset: str, side: int) -> dict:
    """Analytic float32 sizes (GiB) of the tensors that set each path's memory, for batch 1.

    ``reference``: per layer, the spatial cross-attention's sampled tensor (B*N*heads, Dh, Q, Z*k)
    that ``grid_sample`` returns, its stacked copy kept for the backward, and the temporal
    attention's (B*heads, Dh, Q, 2*P); three such layers are alive at the end of the forward.
    ``fast``: per layer, the spatial attention's sampling locations and weights for every camera
    (B*N, Q, heads, Z*k, 2 + 1), its largest per-query input (the fast path saves only its inputs
    and rebuilds the sparse matrix chunk by chunk); the rest of its memory is the ordinary per-query
    activations of the layers, which ``--breakdown`` lists.
    """
    from bevkit.config import load_experiment

    vt = load_experiment(CONFIGS / f"{preset}.yaml").model.view_transform
    q, n, heads, dh = side * side, 6, vt.heads, vt.channels // vt.heads
    p_sca, p_tsa = vt.num_z * vt.points_per_z, 2 * vt.tsa_points
    sampled = n * heads * dh * q * p_sca * 4
    tsa = heads * dh * q * p_tsa * 4
    locs = n * q * heads * p_sca * 3 * 4
    return {"reference_sampled_per_layer_gib": sampled / GIB, "reference_tsa_sampled_per_layer_gib": tsa / GIB,
            "fast_saved_locations_weights_per_layer_gib": locs / GIB, "layers": vt.layers}


def saved_for_backward(enc, inputs) -> dict:
    """What the forward keeps for the backward: every tensor autograd saves (parameters and the
    inputs excluded), counted once per storage, grouped by shape; the largest groups first.

    Run in its own forward (no backward), so it does not disturb the peak measured by ``child``.
    """
    seen, groups = set(), {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                name = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                count, nbytes = groups.get(name, (0, 0))
                groups[name] = (count + 1, nbytes + storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(*inputs)
    total = sum(n for _, n in groups.values())
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]
    return {"total_gib": total / GIB,
            "largest": [{"shape": k, "count": c, "gib": n / GIB} for k, (c, n) in top]}


def child(preset: str, side: int, impl: str, breakdown: bool, stride: int | None = None) -> dict:
    torch.set_num_threads(1)
    enc, feats, intr, img_aug, ego_from_cam, prev, motion = setup(preset, side, impl, stride)
    inputs = (feats, intr, img_aug, ego_from_cam, prev, motion)
    gc.collect()
    before = reset_peak()
    t0 = time.perf_counter()
    bev, _ = enc(*inputs)
    bev.square().mean().backward()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    out = {"side": side, "queries": side * side, "impl": impl, "rss_before_gib": before * 1024 / GIB,
           "peak_rss_gib": peak * 1024 / GIB, "step_gib": (peak - before) * 1024 / GIB, "seconds": seconds,
           "value_map": list(feats.shape[-2:])}
    if breakdown:
        del bev
        out["saved_for_backward"] = saved_for_backward(enc, inputs)
    return out


def run_child(args, side: int, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--preset", args.preset, "--child", f"{side}:{impl}"]
    cmd += ["--breakdown"] if args.breakdown else []
    cmd += ["--stride", str(args.stride)] if args.stride else []
    res = run_watched(cmd, args.max_rss_gb, args.timeout)
    if "error" in res:
        res = {"side": side, "queries": side * side, "impl": impl, **res}
    return res


def fit(rows: list[dict]) -> dict | None:
    """Least-squares line step_gib = a + b * queries over the sizes that ran."""
    ok = [r for r in rows if "step_gib" in r]
    if len(ok) < 2:
        return None
    x = np.array([r["queries"] for r in ok], dtype=float)
    y = np.array([r["step_gib"] for r in ok])
    b, a = np.polyfit(x, y, 1)
    return {"intercept_gib": float(a), "gib_per_10k_queries": float(b * 1e4),
            "at_200x200_gib": float(a + b * 40000), "sizes": [r["side"] for r in ok]}


def markdown(report: dict) -> str:
    lines = ["| BEV grid | queries | implementation | RSS before (GiB) | peak RSS (GiB) | step peak (GiB) "
             "| analytic dominant tensors (GiB) | s |", "|---" * 8 + "|"]
    for r in report["runs"]:
        d = report["dominant"][str(r["side"])]
        if r["impl"] == "reference":
            an = (f"sampled {d['reference_sampled_per_layer_gib']:.2f} x 2 (+ TSA "
                  f"{d['reference_tsa_sampled_per_layer_gib']:.2f}) per layer")
        else:
            an = (f"locations + weights {d['fast_saved_locations_weights_per_layer_gib']:.2f} per layer "
                  "(rest: per-query activations)")
        if "error" in r:
            lines.append(f"| {r['side']}x{r['side']} | {r['queries']} | {r['impl']} | {r['error']} "
                         f"(max seen {r['max_rss_seen_gib']:.1f}) | | | {an} | |")
            continue
        lines.append(f"| {r['side']}x{r['side']} | {r['queries']} | {r['impl']} | {r['rss_before_gib']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | **{r['step_gib']:.2f}** | {an} | {r['seconds']:.0f} |")
    lines.append("")
    for r in report["runs"]:
        sb = r.get("saved_for_backward")
        if sb:
            parts = ", ".join(f"{g['count']} x {g['shape']}: {g['gib']:.2f}" for g in sb["largest"][:5])
            lines.append(f"- saved for the backward, {r['side']}x{r['side']} `{r['impl']}`: {sb['total_gib']:.2f} GiB "
                         f"in all; largest (GiB): {parts}")
    for impl, f in report["fits"].items():
        if f:
            lines.append(f"- `{impl}`: step peak = {f['intercept_gib']:.2f} GiB + {f['gib_per_10k_queries']:.3f} GiB "
                         f"per 10 000 queries (fit over sides {f['sizes']}); at 200x200: {f['at_200x200_gib']:.2f} GiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bevformer-small", help="a deform preset whose encoder settings to use")
    ap.add_argument("--sides", nargs="+", type=int, default=[50, 100, 150, 200], help="BEV grid sides")
    ap.add_argument("--impls", nargs="+", default=["fast", "reference"], choices=["fast", "reference", "exportable"])
    ap.add_argument("--stride", type=int, default=None,
                    help="image feature stride (default: the preset's neck's)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--max-rss-gb", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="also list the tensors the forward saves for the backward (one more forward)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, impl = args.child.split(":")
        print("RESULT " + json.dumps(child(args.preset, int(side), impl, args.breakdown, args.stride)), flush=True)
        return
    report = {"torch": torch.__version__, "python": platform.python_version(), "preset": args.preset, "stride": args.stride,
              "threads": 1, "date": time.strftime("%Y-%m-%d"), "runs": [],
              "dominant": {str(s): dominant_bytes(args.preset, s) for s in args.sides}}
    for impl in args.impls:
        for side in sorted(args.sides):
            print(f"[bench_bevformer_memory] {side}x{side} {impl} ...", file=sys.stderr, flush=True)
            r = run_child(args, side, impl)
            report["runs"].append(r)
            print(f"[bench_bevformer_memory] {json.dumps(r)}", file=sys.stderr, flush=True)
            if "error" in r:
                break  # larger grids of this implementation will not fit either
    report["fits"] = {impl: fit([r for r in report["runs"] if r["impl"] == impl]) for impl in args.impls}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    if args.markdown:
        print(markdown(report))


if __name__ == "__main__":
    main()
