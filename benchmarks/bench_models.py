"""Parameters, forward FLOPs and peak training-step memory of the full-size presets in configs/.

Each preset is built with ``bevkit.models.build_model`` from its YAML (``--set a.b=v`` overrides
apply to every selected preset) and measured in its own child process, one at a time, with one
torch thread:

- ``params``: ``sum(p.numel())`` per top-level component (millions).
- ``flops``: one forward pass at batch 1 in eval mode under ``torch.no_grad()`` and
  ``torch.utils.flop_counter.FlopCounterMode``: six cameras at the preset's ``data.image_size``
  with the nuScenes rig's calibration (``bevkit.data.synth.rig.load_rig`` at 1600x900 and the
  reader's deterministic resize-and-crop ``img_aug``), random uint8 images, and ``--points``
  random points (default 300 000) over the grid for presets with a LiDAR branch, or with
  ``--lidar-from-data`` the LiDAR sweeps of a dataset sample (``--data``, ``--split``, ``--index``,
  the preset's ``data.sweeps``): a sparse-voxel encoder's cost follows the occupied voxels, which
  uniform random points overstate. GFLOPs as the
  counter defines them (2 per multiply-add). The counter has no rule for the sparse products: the
  compressed-row products of ``ops.sparse_conv3d`` dispatch to ``aten.mm`` and are counted as if the
  sparse matrix were dense, and the weighted ``embedding_bag`` sums that carry the forward products
  of ``ops.bev_pool`` and ``ops.deform_attn`` are not counted at all. A dispatch mode beside the
  counter sees every ``aten.mm`` / ``aten.addmm`` with a sparse operand and every ``embedding_bag``
  and records what the counter counted for them (``sparse_as_dense``, 0 for the bags;
  ``without_sparse`` is the total minus it) and what the products cost as the sparse products they
  are (``sparse_true``: 2 FLOPs per stored entry of the sparse matrix, or bag entry, and column of
  the dense one; ``bag_true`` is the bags' share); ``with_sparse_true`` is ``without_sparse`` plus
  ``sparse_true``. (The earlier,
  module-based estimate of ``sparse_as_dense``, the ``aten.mm`` the view transform's and the DETR
  decoder's cross-attention modules count for themselves, is kept as ``sparse_as_dense_by_module``;
  the two agree where no sparse LiDAR encoder runs.)
- ``train-memory``: one training step (forward + loss + backward, no optimiser step) at batch 1
  on a sample of a nuScenes-format dataset read exactly as ``bevkit train`` reads it
  (``engine.data.data_config`` for the preset without augmentation, ``HistoryDataset`` for the
  history frames a temporal model reads, ``engine.module.with_history`` encoding them without
  gradient, then ``model.loss``), in float32 and / or under ``torch.autocast("cpu", bfloat16)``.
  Peak memory is the child's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus its resident set just before the step
  (model built, no gradients yet, batch loaded); both are reported, and whether the loss was
  finite. A child whose resident set passes ``--max-rss-gb`` or that runs past ``--timeout`` is
  stopped and reported as such.

Prints one JSON document (``--json FILE`` also writes it) and, with ``--markdown``, the tables.

    bevkit synth data/synth-mini --preset mini            # the data for train-memory
    python benchmarks/bench_models.py --measure params flops --markdown
    python benchmarks/bench_models.py --measure train-memory --precisions fp32 bf16 \\
        --data data/synth-mini --markdown
    python benchmarks/bench_models.py --presets bevformer-small --measure train-memory \\
        --set "model.grid.xbound=[-51.2,51.2,0.512]" --set "model.grid.ybound=[-51.2,51.2,0.512]"
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from procmem import GIB, reset_peak, run_watched, status_kib

from bevkit.atomic import write_text_atomic
from bevkit.bench import SparseProductCounter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FULL_SIZE = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("-synth"))
COMPONENTS = ("backbone", "neck", "view_transform", "lidar", "fuser", "temporal", "map_prior", "bev_encoder", "heads")


def load_preset(name: str, overrides: list[str]):
    from bevkit.config import load_experiment

    return load_experiment(CONFIGS / f"{name}.yaml", overrides)


def rig_batch(exp, points: int, seed: int = 0) -> dict:
    """A batch of one sample in the collated layout: six nuScenes cameras at ``data.image_size``
    (random uint8 pixels, the rig's intrinsics and extrinsics, the reader's deterministic
    ``img_aug``) and ``points`` uniform random points over the grid (x, y, z, intensity, dt).

    Shapes:
        returns: images (1, 6, 3, H, W), intrinsics / img_aug (1, 6, 3, 3), ego_from_cam (1, 6, 4, 4),
                 points [(P, 5)]
    """
    from bevkit.data.augment import ImageAugConfig, image_aug_matrix
    from bevkit.data.synth.rig import load_rig

    gen = torch.Generator().manual_seed(seed)
    rig = load_rig(scale=1.0)
    cams = [rig.camera(ch) for ch in exp.data.cameras]
    h, w = exp.data.image_size
    aug = [image_aug_matrix((c.height, c.width), ImageAugConfig(final_size=(h, w)), None) for c in cams]
    batch = {
        "images": torch.randint(0, 256, (1, len(cams), 3, h, w), dtype=torch.uint8, generator=gen),
        "intrinsics": torch.tensor(np.stack([c.intrinsics for c in cams]), dtype=torch.float32)[None],
        "img_aug": torch.tensor(np.stack(aug), dtype=torch.float32)[None],
        "ego_from_cam": torch.tensor(np.stack([c.ego_from_cam for c in cams]), dtype=torch.float32)[None],
    }
    g = exp.model.grid
    lo = torch.tensor([g.xbound[0], g.ybound[0], g.zbound[0], 0.0, 0.0])
    hi = torch.tensor([g.xbound[1], g.ybound[1], g.zbound[1], 1.0, 0.5])
    batch["points"] = [lo + (hi - lo) * torch.rand(points, 5, generator=gen)]
    return batch


def dataset_batch(exp, root: str, split: str, index: int) -> dict:
    """Sample ``index`` of ``split`` as ``bevkit train`` reads it (no augmentation), with the history
    frames the model reads, collated to a batch of one."""
    from bevkit.data.dataset import NuScenesDataset
    from bevkit.engine.data import (
        HistoryDataset,
        collate_history,
        data_config,
        history_frames,
    )

    base = NuScenesDataset(root, split, data_config(exp, train=False))
    return collate_history([HistoryDataset(base, history_frames(exp))[index]])


# ------------------------------------------------------------------------------------------ children
def child_params(exp) -> dict:
    from bevkit.models import build_model

    with torch.device("meta"):
        model = build_model(exp.model, load_checkpoint=False, num_cameras=len(exp.data.cameras))
    out = {}
    for name in COMPONENTS:
        mod = getattr(model, name)
        out[name] = None if mod is None else sum(p.numel() for p in mod.parameters()) / 1e6
    out["total"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


def child_flops(exp, points: int, data_points: list | None = None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from bevkit.models import build_model

    torch.manual_seed(0)
    model = build_model(exp.model, load_checkpoint=False, num_cameras=len(exp.data.cameras)).eval()
    batch = rig_batch(exp, points)
    if data_points is not None:
        batch["points"] = data_points
    counter = FlopCounterMode(display=False)
    sparse_counter = SparseProductCounter()
    t0 = time.perf_counter()
    with torch.no_grad(), counter, sparse_counter:
        model(batch)
    seconds = time.perf_counter() - t0
    counts = counter.get_flop_counts()

    def total(prefix: str, op: str | None = None) -> float:
        # A ModuleDict (the heads) is never called itself: sum its called children.
        names = [prefix] if prefix in counts else [k for k in counts if k.startswith(prefix + ".")
                                                   and "." not in k[len(prefix) + 1:]]
        return sum(v for n in names for k, v in counts[n].items() if op is None or str(k) == op) / 1e9

    def own(name: str, op: str) -> float:
        # What a module computes itself, not through its submodules: counts are inclusive, and a
        # container that is never called (a ModuleList) has no entry, so the nearest counted
        # descendants are subtracted.
        below = [k for k in counts if k.startswith(name + ".")]
        kids = [k for k in below if not any(k.startswith(o + ".") for o in below if o != k)]
        mine = sum(v for k, v in counts.get(name, {}).items() if str(k) == op)
        return (mine - sum(v for kid in kids for k, v in counts[kid].items() if str(k) == op)) / 1e9

    everything = total("Global")
    # The CSR products of ops.bev_pool / ops.deform_attn dispatch to aten.mm inside the view transform's
    # modules and the DETR decoder's cross-attention (their Linear layers are counted apart, as children).
    decoder = re.compile(r"BEVModel\.heads\.detection\.layers\.\d+\.cross_attn")
    head_sparse = sum(own(n, "aten.mm") for n in counts if decoder.fullmatch(n))
    # Every sparse product, wherever it runs (the view transform, the DETR decoder, the sparse LiDAR
    # encoder's scatters), as the counter counted it.
    sparse = sparse_counter.as_dense / 1e9
    return {"image": None if exp.model.view_transform is None else "x".join(map(str, exp.data.image_size)),
            "points": int(sum(len(p) for p in batch["points"])) if exp.model.lidar is not None else 0,
            "points_from": "data" if data_points is not None else "random",
            "gflops": everything, "sparse_as_dense": sparse, "without_sparse": everything - sparse,
            "sparse_true": sparse_counter.flops / 1e9, "bag_true": sparse_counter.bag_flops / 1e9,
            "with_sparse_true": everything - sparse + sparse_counter.flops / 1e9,
            "backbone": total("BEVModel.backbone") if exp.model.view_transform is not None else None,
            "bev_encoder": total("BEVModel.bev_encoder"), "heads": total("BEVModel.heads") - head_sparse,
            "by_component": {name: total(f"BEVModel.{name}") for name in COMPONENTS},
            "sparse_as_dense_by_module": sum(own(n, "aten.mm") for n in counts if n == "BEVModel.view_transform"
                                             or n.startswith("BEVModel.view_transform.")) + head_sparse,
            "seconds": seconds}


def child_train_memory(exp, precision: str, root: str, split: str, index: int) -> dict:
    from bevkit.engine.module import with_history
    from bevkit.models import build_model

    torch.manual_seed(0)
    model = build_model(exp.model, load_checkpoint=False, num_cameras=len(exp.data.cameras)).train()
    batch = dataset_batch(exp, root, split, index)
    gc.collect()
    before = reset_peak()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        run = with_history(model, batch)
        out = model(run)
        losses = model.loss(out, run)
    losses["loss"].backward()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"precision": precision, "rss_before_gib": before * 1024 / GIB, "peak_rss_gib": peak * 1024 / GIB,
            "step_gib": (peak - before) * 1024 / GIB, "seconds": seconds,
            "loss": float(losses["loss"].detach()), "finite": bool(torch.isfinite(losses["loss"]).item()),
            "image": None if exp.model.view_transform is None else "x".join(map(str, exp.data.image_size)),
            "grid": "x".join(map(str, exp.model.grid.shape)),
            "points": int(sum(len(p) for p in batch.get("points", []))),
            "history_frames": len(batch.get("history", []))}


def child_main(args) -> None:
    torch.set_num_threads(1)
    exp = load_preset(args.child, args.set)
    if args.child_kind == "params":
        result = child_params(exp)
    elif args.child_kind == "flops":
        data_points = None
        if args.lidar_from_data and exp.model.lidar is not None:
            data_points = dataset_batch(exp, args.data, args.split, args.index)["points"]
        result = child_flops(exp, args.points, data_points)
    else:
        result = child_train_memory(exp, args.child_kind.split(":")[1], args.data, args.split, args.index)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent
def run_child(preset: str, kind: str, args) -> dict:
    """One measurement in a fresh process; stopped past ``--timeout`` or ``--max-rss-gb``."""
    cmd = [sys.executable, __file__, "--child", preset, "--child-kind", kind, "--points", str(args.points),
           "--data", str(args.data), "--split", args.split, "--index", str(args.index)]
    if args.lidar_from_data:
        cmd.append("--lidar-from-data")
    for item in args.set:
        cmd += ["--set", item]
    return run_watched(cmd, args.max_rss_gb, args.timeout)


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict) -> str:
    lines = []
    rows = report["results"]
    if any("params" in r for r in rows.values()):
        lines += ["| preset | " + " | ".join(COMPONENTS) + " | total |", "|---" * (len(COMPONENTS) + 2) + "|"]
        for name, r in rows.items():
            p = r.get("params", {})
            lines.append(f"| `{name}` | " + " | ".join(_fmt(p.get(c)) for c in COMPONENTS) + f" | {_fmt(p.get('total'))} |")
        lines.append("")
    if any("flops" in r for r in rows.values()):
        lines += ["| preset | image | GFLOPs counted | sparse products counted as dense | GFLOPs without them "
                  "| sparse products, 2 per stored entry x column | GFLOPs with them so | of which backbone "
                  "| BEV encoder | heads | s |", "|---" * 11 + "|"]
        for name, r in rows.items():
            f = r.get("flops")
            if f is None:
                continue
            if "error" in f:
                lines.append(f"| `{name}` | {f['error']} |" + " |" * 9)
                continue
            lines.append(f"| `{name}` | {f['image'] or '–'} | {f['gflops']:.1f} | {f['sparse_as_dense']:.1f} | "
                         f"{f['without_sparse']:.1f} | {f['sparse_true']:.2f} | {f['with_sparse_true']:.1f} | "
                         f"{_fmt(f['backbone'], 1)} | {f['bev_encoder']:.1f} | "
                         f"{f['heads']:.1f} | {f['seconds']:.1f} |")
        lines.append("")
    mem = [(name, k, v) for name, r in rows.items() for k, v in r.items() if k.startswith("train-memory:")]
    if mem:
        lines += ["| preset | precision | image | grid | RSS before step (GiB) | peak RSS (GiB) | step peak "
                  "(GiB) | loss finite | s |", "|---" * 9 + "|"]
        for name, kind, m in mem:
            prec = kind.split(":")[1]
            if "error" in m:
                lines.append(f"| `{name}` | {prec} | {m['error']} (max seen {m['max_rss_seen_gib']:.1f} GiB) |"
                             + " |" * 6)
                continue
            lines.append(f"| `{name}` | {prec} | {m['image'] or '–'} | {m['grid']} | {m['rss_before_gib']:.2f} | "
                         f"{m['peak_rss_gib']:.2f} | **{m['step_gib']:.2f}** | {'yes' if m['finite'] else 'no'} | "
                         f"{m['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=FULL_SIZE, help=f"default: {' '.join(FULL_SIZE)}")
    ap.add_argument("--measure", nargs="+", default=["params", "flops"], choices=["params", "flops", "train-memory"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--set", action="append", default=[], help="a.b=v override applied to every preset")
    ap.add_argument("--points", type=int, default=300_000, help="random points for LiDAR presets (flops)")
    ap.add_argument("--data", default="data/synth-mini", help="nuScenes-format root (train-memory)")
    ap.add_argument("--lidar-from-data", action="store_true",
                    help="flops: LiDAR points of the --data sample instead of random ones")
    ap.add_argument("--split", default="mini_train")
    ap.add_argument("--index", type=int, default=1, help="sample of the split (1: it has a previous keyframe)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--max-rss-gb", type=float, default=20.0, help="stop a child whose resident set passes this")
    ap.add_argument("--json", type=Path, help="also write the JSON report here")
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    unknown = [p for p in args.presets if not (CONFIGS / f"{p}.yaml").exists()]
    if unknown:
        ap.error(f"no preset {unknown} in {CONFIGS}")
    if "train-memory" in args.measure and not Path(args.data).exists():
        ap.error(f"--data {args.data} does not exist (bevkit synth {args.data} --preset mini)")
    kinds = [m for m in args.measure if m != "train-memory"]
    kinds += [f"train-memory:{p}" for p in args.precisions] if "train-memory" in args.measure else []
    report = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "threads": 1, "overrides": args.set, "points": args.points, "date": time.strftime("%Y-%m-%d"),
              "results": {}}
    for preset in args.presets:
        row = report["results"].setdefault(preset, {})
        for kind in kinds:
            print(f"[bench_models] {preset} {kind} ...", file=sys.stderr, flush=True)
            row[kind] = run_child(preset, kind, args)
            print(f"[bench_models] {preset} {kind}: {json.dumps(row[kind])}", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    if args.markdown:
        print(markdown(report))


if __name__ == "__main__":
    main()
