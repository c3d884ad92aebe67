"""The small synthetic presets side by side: each trained with the same budget, then evaluated.

Every preset gets the same data (the synthetic ``small`` world's train split, evaluated on its val
split), the same number of epochs, batch size, optimiser and schedule, and the same evaluation range
(the class ranges capped at the presets' 12.8 m grid, ``eval.max_range``). Each preset runs as the two
commands a user would type (printed before they run), ``bevkit train`` then ``bevkit eval``, in its own
process, so its peak memory is its own. Results go to ``OUT/compare.json`` and a markdown table is
printed. A preset whose record (``compare_record.json``) already exists is not run again (delete its folder to redo it);
a record made with other ``--set`` overrides (a record without them counts as none) is refused.

    bevkit synth runs/synth-small --preset small
    python benchmarks/compare_presets.py --data runs/synth-small --out runs/compare [--epochs 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bevkit.atomic import write_text_atomic

# (preset, what it stands for); the map preset is scored by map IoU, the others by detection.
PRESETS = (
    ("bevdet-synth", "camera, lift-splat (BEVDet)"),
    ("bevdepth-synth", "camera, lift-splat + depth supervision (BEVDepth)"),
    ("bevdet4d-synth", "camera, temporal (BEVDet4D, 2 frames)"),
    ("bevformer-synth", "camera, deformable attention (BEVFormer encoder + DETR head)"),
    ("pointpillars-synth", "LiDAR (PointPillars)"),
    ("bevfusion-pillars-synth", "camera + LiDAR (BEVFusion's fuser, PointPillars LiDAR)"),
    ("bevfusion-synth", "camera + LiDAR (BEVFusion, sparse-voxel LiDAR)"),
    ("nmp-synth", "map segmentation (NMP baseline, BEVFormer encoder)"),
)
LIDAR = {"pointpillars-synth", "bevfusion-pillars-synth", "bevfusion-synth"}


def common_overrides(args) -> list[str]:
    """The shared budget: data, epochs, batch, optimiser, schedule, evaluation range."""
    return [
        f"data.root={args.data}", f"data.train_split={args.train_split}", f"data.val_split={args.val_split}",
        f"data.batch_size={args.batch}", f"data.eval_batch_size={args.batch}", f"data.workers={args.workers}",
        f"train.epochs={args.epochs}", f"train.lr={args.lr}",
        "train.schedule={type: cyclic, up_fraction: 0.4, peak: 2.0, final: 0.01}",
        "train.grad_clip=10.0", f"train.val_every={args.epochs + 1}",  # evaluated once, by bevkit eval
        f"eval.max_range={args.max_range}",
    ]


def preset_overrides(name: str, args) -> list[str]:
    out = [f"out={args.out}/{name}"]
    if name in LIDAR:
        out.append(f"data.sweeps={args.sweeps}")  # the time-lag channel LiDAR velocity is learnt from
    return out


def run(args: list[str], log: Path) -> tuple[float, float]:
    """``bevkit ARGS`` with its output appended to ``log``. Returns (wall seconds, peak RSS in MB of that
    process alone, from its own rusage); exits with the log's name if the command fails."""
    print("$ bevkit " + " ".join(shlex.quote(c) for c in args), flush=True)
    start = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "bevkit.cli", *args], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bevkit {args[0]} failed with exit code {code}; see {log}")
    return time.time() - start, usage.ru_maxrss / 1024.0  # Linux: ru_maxrss in KiB


def metrics_of(eval_dir: Path) -> dict:
    """What the table shows, read back from the files ``bevkit eval`` wrote."""
    out = {}
    det = eval_dir / "metrics_summary.json"
    if det.is_file():
        s = json.loads(det.read_text())
        out.update(mAP=s["mean_ap"], NDS=s["nd_score"], mATE=s["tp_errors"]["trans_err"],
                   mAVE=s["tp_errors"]["vel_err"], car_AP=s["mean_dist_aps"]["car"],
                   car_AVE=s["label_tp_errors"]["car"]["vel_err"], max_range=max(s["cfg"]["class_range"].values()))
    mp = eval_dir / "map_metrics.json"
    if mp.is_file():
        out["map"] = json.loads(mp.read_text())
    return out


def one(name: str, args) -> dict:
    run_dir = Path(args.out) / name
    eval_dir = run_dir / f"eval-{args.val_split}"
    record = run_dir / "compare_record.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("extra_sets", []) != list(args.sets):  # a record from before --set existed has none
            raise SystemExit(f"{record}: made with --set {done.get('extra_sets', [])}, not {list(args.sets)}; "
                             f"delete {run_dir} to redo it, or give another --out")
        print(f"{name}: already done ({record})", flush=True)
        return {**done, **metrics_of(eval_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = [a for s in (*common_overrides(args), *preset_overrides(name, args), *args.sets) for a in ("--set", s)]
    config = f"configs/{name}.yaml"
    log = run_dir / "compare.log"
    train_s, train_rss = run(["train", config, *sets, "--overwrite"], log)
    eval_s, _ = run(["eval", config, str(run_dir / "checkpoints" / "last.ckpt"), *sets], log)
    rec = {"preset": name, "extra_sets": list(args.sets), "train_seconds": round(train_s, 1),
           "eval_seconds": round(eval_s, 1),
           "train_peak_rss_mb": round(train_rss, 1), **metrics_of(eval_dir)}
    write_text_atomic(record, json.dumps(rec, indent=2))
    return rec


def table(records: list[dict]) -> str:
    what = dict(PRESETS)
    lines = ["| preset | what | mAP | NDS | mATE | mAVE | car AP | car AVE | map IoU | train min | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        det = [f"{r[k]:.3f}" if k in r else "" for k in ("mAP", "NDS", "mATE", "mAVE", "car_AP", "car_AVE")]
        m = r.get("map")
        miou = ""
        if m:  # Neural Map Prior's mIoU is over divider, ped_crossing and boundary; drivable apart
            nmp = [m[k] for k in ("divider", "ped_crossing", "boundary") if k in m]
            ious = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "mIoU")
            miou = f"{ious}; mIoU (NMP's three) {sum(nmp) / len(nmp):.3f}" if nmp else ious
        lines.append(f"| {r['preset']} | {what.get(r['preset'], '')} | {' | '.join(det)} | {miou} | "
                     f"{r['train_seconds'] / 60:.1f} | {r['train_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


# The orderings the papers report: (claim, preset a, metric, "<" or ">", preset b).
ORDERINGS = (
    ("depth supervision above plain lift-splat (mAP)", "bevdepth-synth", "mAP", ">", "bevdet-synth"),
    ("depth supervision above plain lift-splat (NDS)", "bevdepth-synth", "NDS", ">", "bevdet-synth"),
    ("temporal velocity error below single-frame (mAVE)", "bevdet4d-synth", "mAVE", "<", "bevdet-synth"),
    ("temporal velocity error below single-frame (car AVE)", "bevdet4d-synth", "car_AVE", "<", "bevdet-synth"),
    *((f"fusion above {what} only ({metric})", fused, metric, ">", single)
      for fused in ("bevfusion-pillars-synth", "bevfusion-synth") for metric in ("mAP", "NDS")
      for what, single in (("LiDAR", "pointpillars-synth"), ("camera", "bevdet-synth"))),
)


def orderings(records: list[dict]) -> list[str]:
    """Each published ordering with both figures and whether it holds here (skipped if a preset is missing)."""
    by = {r["preset"]: r for r in records}
    lines = []
    for claim, a, metric, op, b in ORDERINGS:
        if a in by and b in by and metric in by[a] and metric in by[b]:
            x, y = by[a][metric], by[b][metric]
            holds = x > y if op == ">" else x < y
            lines.append(f"- {claim}: {a} {x:.3f} {op} {b} {y:.3f}? {'holds' if holds else 'does NOT hold'}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the small synthetic world (bevkit synth DIR --preset small)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--presets", nargs="*", default=[n for n, _ in PRESETS])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--max-range", type=float, default=12.8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for every preset's train and eval (repeatable), e.g. "
                        "train.drop_empty_boxes=false; recorded in each preset's compare_record.json")
    args = p.parse_args(argv)
    unknown = sorted(set(args.presets) - {n for n, _ in PRESETS})
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; choose from {[n for n, _ in PRESETS]}")
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: no such dataset folder (bevkit synth {args.data} --preset small)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    records = [one(name, args) for name in args.presets]
    write_text_atomic(Path(args.out) / "compare.json", json.dumps({"args": vars(args), "records": records}, indent=2))
    print(table(records))
    print("\n".join(orderings(records)))


if __name__ == "__main__":
    main()
