"""bevkit's nuScenes detection metric against the devkit's DetectionEval, same inputs, one run (JSON out).

    python benchmarks/bench_eval_detection.py --data /tmp/evaltiny [--split mini_val] [--boxes 500]

Without --data a ``tiny`` synthetic dataset is written to a temporary folder first. The predictions are
the split's ground truth jittered, partly dropped, mislabelled and padded with random boxes up to
``--boxes`` per sample (500 is the benchmark's limit). Timings are medians over ``--repeat``
alternating runs:

- ``devkit``: ``DetectionEval(nusc, ...)`` (loads results and GT, filters) + ``evaluate()``, with the
  ``NuScenes`` tables already loaded;
- ``bevkit_file``: ``load_detection_gt`` + ``load_results`` + ``evaluate_boxes``, tables already loaded;
- ``bevkit_in_memory``: ``evaluate_boxes`` on boxes already in memory (what ``DetectionEvaluator.compute``
  runs at the end of a validation epoch; the devkit has no such path and always goes through a file);
- ``*_end_to_end``: from the paths, table loading included (``NuScenes(...)`` + DetectionEval vs ``score``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--split", default="mini_val")
    ap.add_argument("--boxes", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from bevkit.data.nuscenes import NuScenesTables
    from bevkit.eval.detection import evaluate_boxes
    from bevkit.eval.groundtruth import load_detection_gt
    from bevkit.eval.perturb import make_results
    from bevkit.eval.results import load_results
    from bevkit.eval.score import score

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    root = args.data
    if root is None:
        from bevkit.data.synth import generate

        root = work / "tiny"
        generate(root, preset="tiny", seed=0, workers=2, progress=False)
    nusc = NuScenes(args.version, str(root), verbose=False)
    tables = NuScenesTables(root, args.version)
    results = make_results(tables, args.split, "mixed", seed=0, boxes_per_sample=args.boxes)
    path = work / "results.json"
    path.write_text(json.dumps(results))
    n_boxes = sum(len(b) for b in results["results"].values())
    cfg = config_factory("detection_cvpr_2019")

    def devkit():
        ev = DetectionEval(nusc, cfg, str(path), args.split, str(work / "devkit"), verbose=False)
        return ev.evaluate()[0].serialize()

    def bevkit_file():
        gt = load_detection_gt(tables, args.split)
        pred, _ = load_results(path, gt.sample_tokens)
        return evaluate_boxes(gt.boxes, pred, gt.ego_translation, gt.racks).summary

    gt = load_detection_gt(tables, args.split)
    pred, _ = load_results(path, gt.sample_tokens)

    def bevkit_in_memory():
        return evaluate_boxes(gt.boxes, pred, gt.ego_translation, gt.racks).summary

    def devkit_end_to_end():
        n = NuScenes(args.version, str(root), verbose=False)
        return DetectionEval(n, cfg, str(path), args.split, str(work / "devkit"), verbose=False).evaluate()[0]

    def bevkit_end_to_end():
        return score(path, root, args.version, args.split, None)

    fns = {"devkit": devkit, "bevkit_file": bevkit_file, "bevkit_in_memory": bevkit_in_memory,
           "devkit_end_to_end": devkit_end_to_end, "bevkit_end_to_end": bevkit_end_to_end}
    times = {k: [] for k in fns}
    out = {}
    for _ in range(args.repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref, ours = out["devkit"], out["bevkit_file"]
    diffs = [abs(ref["mean_ap"] - ours["mean_ap"]), abs(ref["nd_score"] - ours["nd_score"])]
    for c in ref["label_aps"]:
        diffs += [abs(ref["label_aps"][c][th] - ours["label_aps"][c][th]) for th in ref["label_aps"][c]]
    report = {
        "dataset": str(root), "split": args.split, "samples": len(results["results"]), "pred_boxes": n_boxes,
        "gt_boxes": int(len(gt.boxes)), "repeat": args.repeat,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "speedup_file": round(med["devkit"] / med["bevkit_file"], 1),
        "speedup_in_memory": round(med["devkit"] / med["bevkit_in_memory"], 1),
        "speedup_end_to_end": round(med["devkit_end_to_end"] / med["bevkit_end_to_end"], 1),
        "mAP": ours["mean_ap"], "NDS": ours["nd_score"], "max_abs_diff_mAP_NDS_AP": max(diffs),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
