"""Neural Map Prior against its baseline on the small synthetic world, with NMP's two-stage schedule.

Stage 1 is the map-segmentation baseline (``configs/nmp-synth.yaml``), given with ``--baseline CKPT`` or
trained here for ``--epochs``. Stage 2 starts from it three times with the same budget: the baseline
trained further (``nmp-synth``), and the same model with the global map memory added
(``nmp-prior-synth``, ``train.init_from``) trained twice, visiting each scene's keyframes in time order
(NMP's protocol, ``train.order: auto``) and shuffled like the baseline (``train.order=shuffle``), which
separates the effect of the order from the prior's. Everything is scored on the val split; the
map-prior models three times: with the memory filled online in (scene, time) order (NMP's protocol),
with the memory first filled from the train split's drives (``eval.map_prior=train``, a prior built
from earlier drives), and with an empty prior for every sample (the ablation that isolates the memory
from the extra layers). Every step is a ``bevkit`` command in its own process, printed before it runs,
with the shared budget of ``compare_presets.py``; a stage whose last checkpoint exists is only evaluated.

    python benchmarks/compare_map_prior.py --data runs/synth-small --out runs/map-prior \\
        --baseline runs/compare/nmp-synth/checkpoints/last.ckpt --epochs 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compare_presets import common_overrides, run

from bevkit.atomic import write_text_atomic

CLASSES = ("divider", "ped_crossing", "boundary", "drivable")


def map_metrics(eval_dir: Path) -> dict:
    m = json.loads((eval_dir / "map_metrics.json").read_text())
    m["nmp_mIoU"] = sum(m[k] for k in ("divider", "ped_crossing", "boundary")) / 3  # NMP's three classes
    return m


def stage(name: str, preset: str, args, extra: list[str], evals: dict[str, list[str]]) -> dict:
    """Train ``preset`` into OUT/name (unless its last checkpoint exists) and evaluate it once per entry of
    ``evals`` (eval folder suffix -> extra overrides)."""
    run_dir = Path(args.out) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "compare.log"
    sets = [a for s in (*common_overrides(args), f"out={run_dir}", *extra) for a in ("--set", s)]
    config = f"configs/{preset}.yaml"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    rec: dict = {"name": name, "preset": preset}
    if not ckpt.is_file():
        rec["train_seconds"], rec["train_peak_rss_mb"] = (round(v, 1) for v in
                                                          run(["train", config, *sets, "--overwrite"], log))
    for suffix, more in evals.items():
        out = run_dir / f"eval-{args.val_split}{suffix}"
        more_sets = [a for s in more for a in ("--set", s)]
        secs, _ = run(["eval", config, str(ckpt), *sets, *more_sets, "--out", str(out)], log)
        rec[f"eval{suffix or ''}"] = {"seconds": round(secs, 1), **map_metrics(out)}
    return rec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the small synthetic world (bevkit synth DIR --preset small)")
    p.add_argument("--out", default="runs/map-prior")
    p.add_argument("--baseline", default=None, help="stage 1: a trained nmp-synth checkpoint (else trained here)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each stage")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-range", type=float, default=12.8)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: no such dataset folder (bevkit synth {args.data} --preset small)")
    records = []
    base = args.baseline
    if base is None:
        records.append(stage("stage1", "nmp-synth", args, [], {"": []}))
        base = str(Path(args.out) / "stage1" / "checkpoints" / "last.ckpt")
    elif not Path(base).is_file():
        raise SystemExit(f"{base}: no such checkpoint")
    init = [f"train.init_from={base}"]
    records.append(stage("baseline", "nmp-synth", args, init, {"": []}))
    both = {"": [], "-train-prior": ["eval.map_prior=train"], "-empty-prior": ["eval.map_prior=empty"]}
    records.append(stage("prior", "nmp-prior-synth", args, init, both))  # scenes in time order, as NMP
    records.append(stage("prior-shuffled", "nmp-prior-synth", args, [*init, "train.order=shuffle"], both))
    write_text_atomic(Path(args.out) / "compare_map_prior.json",
                      json.dumps({"args": vars(args), "records": records}, indent=2))
    print("| run | evaluated | " + " | ".join(CLASSES) + " | mIoU (NMP's three) |")
    print("|---" * (len(CLASSES) + 3) + "|")
    for r in records:
        for key, m in r.items():
            if key.startswith("eval"):
                how = {"eval": "online memory" if r["preset"] == "nmp-prior-synth" else "-",
                       "eval-train-prior": "memory from the train drives, then online",
                       "eval-empty-prior": "empty prior"}[key]
                print(f"| {r['name']} ({r['preset']}) | {how} | " + " | ".join(f"{m[k]:.3f}" for k in CLASSES)
                      + f" | {m['nmp_mIoU']:.3f} |")


if __name__ == "__main__":
    main()
