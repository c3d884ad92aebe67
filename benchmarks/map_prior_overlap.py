"""How much of each keyframe's map-prior patch earlier drives have already seen, per split, as JSON.

Neural Map Prior helps where a street was traversed before; with the memory filled online in (scene,
time) order, what a keyframe can read comes from earlier keyframes of its own drive and from earlier
drives of the split. This walks a split's keyframe poses through a ``MapPriorMemory`` (ones for
features, no model) and reports, per keyframe, the observed fraction of its patch written by earlier
drives only and by anything earlier.

    python benchmarks/map_prior_overlap.py runs/synth-small --splits val train
    python benchmarks/map_prior_overlap.py runs/synth-small --splits val --prefill train
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bevkit.data.nuscenes import NuScenesIndex
from bevkit.models import load_config
from bevkit.models.map_prior import MapPriorMemory


def filled(index: NuScenesIndex, split: str, cfg) -> MapPriorMemory:
    """A memory written by every keyframe of ``split``."""
    mem = MapPriorMemory(1, cfg.grid.xbound[2])
    ones = torch.ones(1, 1, *cfg.grid.shape)
    for s in index.split(split):
        mem.write([index.location(s)], torch.tensor(s["global_from_ego"], dtype=torch.float64)[None],
                  cfg.grid.spec(), ones)
    return mem


def overlap(index: NuScenesIndex, split: str, cfg, prefill: MapPriorMemory | None = None) -> dict:
    grid = cfg.grid.spec()
    ny, nx = cfg.grid.shape
    ones = torch.ones(1, 1, ny, nx)
    by_others, by_any = MapPriorMemory(1, cfg.grid.xbound[2]), MapPriorMemory(1, cfg.grid.xbound[2])
    pre = []
    scene, this_drive, others, anything = None, [], [], []
    for s in index.split(split):
        if s["scene_token"] != scene:  # a new drive: the previous one becomes "earlier drives"
            for loc, pose in this_drive:
                by_others.write([loc], pose, grid, ones)
            scene, this_drive = s["scene_token"], []
        pose = torch.tensor(s["global_from_ego"], dtype=torch.float64)[None]
        loc = index.location(s)
        others.append(by_others.read([loc], pose, grid)[1].mean().item())
        if prefill is not None:
            pre.append(prefill.read([loc], pose, grid)[1].mean().item())
        anything.append(by_any.read([loc], pose, grid)[1].mean().item())
        by_any.write([loc], pose, grid, ones)
        this_drive.append((loc, pose))
    others, anything = np.array(others), np.array(anything)
    out = {"keyframes": len(others), "seen_by_earlier_drives_mean": float(others.mean()),
           "keyframes_over_half_seen_by_earlier_drives": float((others > 0.5).mean()),
           "seen_by_anything_earlier_mean": float(anything.mean())}
    if prefill is not None:
        pre = np.array(pre)
        out.update(seen_by_prefill_mean=float(pre.mean()), keyframes_over_half_seen_by_prefill=float((pre > 0.5).mean()))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--version", default=None)
    ap.add_argument("--splits", nargs="+", default=["val"])
    ap.add_argument("--config", default="configs/nmp-prior-synth.yaml", help="the grid of this preset")
    ap.add_argument("--prefill", default=None, help="also: how much of each patch this split's drives saw "
                    "(what eval.map_prior: train writes first)")
    args = ap.parse_args(argv)
    index = NuScenesIndex.load(args.root, args.version)
    cfg = load_config(args.config)
    prefill = filled(index, args.prefill, cfg) if args.prefill else None
    out = {"benchmark": "map_prior_overlap", "root": args.root, "grid": list(cfg.grid.shape), "prefill": args.prefill,
           "splits": {sp: overlap(index, sp, cfg, prefill) for sp in args.splits}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
