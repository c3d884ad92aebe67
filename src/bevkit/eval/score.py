"""``bevkit score``: a results file from any tool, scored against a nuScenes-format dataset.

No model and no config: the ground truth is read from the dataset's tables with bevkit's reader, the
split's scenes from ``<version>/splits.json`` or the official lists. Writes, when ``out_dir`` is given,
``metrics_summary.json`` (the devkit's keys), ``metrics_details.json`` (the 101-point curves) and
PR-curve PNGs under ``plots/``; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from bevkit.atomic import write_text_atomic
from bevkit.data.nuscenes import NuScenesTables
from bevkit.eval.detection import (
    CLASSES,
    DETECTION_CVPR_2019,
    TP_METRICS,
    DetectionResult,
    detection_config,
    evaluate_boxes,
)
from bevkit.eval.groundtruth import load_detection_gt, split_scenes
from bevkit.eval.results import load_results

TP_SHORT = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}


def score(results_path, data_root, version, split, out_dir=None, plots: bool = True,
          max_range: float | None = None) -> dict:
    """Score ``results_path`` on ``split`` of the dataset at ``data_root`` (``version`` folder, or None for the
    only one). Returns the devkit's ``metrics_summary`` dict (plus ``meta``). ``max_range`` caps every class
    range (see ``detection_config``); None scores the benchmark as defined.

    Raises ``bevkit.eval.ResultsError`` for a bad results file (the message names the sample token and the
    field) and ``bevkit.data.nuscenes.DataError`` for a bad dataset or an unknown split.
    """
    start = time.time()
    tables = NuScenesTables(data_root, version)
    _, official = split_scenes(tables, split)
    gt = load_detection_gt(tables, split)
    pred, meta = load_results(results_path, gt.sample_tokens, exact=official)
    result = evaluate_boxes(gt.boxes, pred, gt.ego_translation, gt.racks, detection_config(max_range),
                            details=out_dir is not None)
    summary = dict(result.summary)
    summary["eval_time"] = time.time() - start
    summary["meta"] = dict(meta)
    if out_dir is not None:
        write_outputs(result, summary, out_dir, plots=plots)
    return summary


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_outputs(result: DetectionResult, summary: dict, out_dir, plots: bool = True) -> None:
    """``metrics_summary.json``, ``metrics_details.json`` and, if ``plots``, the PR curves under ``plots/``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # NaN is written as the devkit's json.dump writes it (NaN), so files compare equal.
    write_text_atomic(out / "metrics_summary.json", json.dumps(_jsonable(summary), indent=2))
    details = {f"{c}:{th}": _jsonable(md) for (c, th), md in result.curves.items()}
    write_text_atomic(out / "metrics_details.json", json.dumps(details, indent=2))
    if plots:
        plot_pr_curves(result, summary, out / "plots")


def plot_pr_curves(result: DetectionResult, summary: dict, plot_dir) -> list:
    """One PNG per class (precision-recall at each matching threshold) and one per threshold (all classes)."""
    from matplotlib.figure import (
        Figure,  # no pyplot: leaves the caller's backend and figures alone
    )

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    cfg = summary.get("cfg", DETECTION_CVPR_2019)
    written = []

    def save(fig, name):
        path = plot_dir / name
        tmp = plot_dir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
        written.append(path)

    for c in CLASSES:
        fig = Figure(figsize=(5, 4), layout="tight")
        ax = fig.subplots()
        for th in cfg["dist_ths"]:
            md = result.curves[(c, th)]
            ax.plot(md["recall"], md["precision"], label=f"{th} m: AP {summary['label_aps'][c][th]:.3f}")
        ax.axvline(cfg["min_recall"], ls="--", c="k", lw=0.5)
        ax.axhline(cfg["min_precision"], ls="--", c="k", lw=0.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="recall", ylabel="precision", title=f"{c}: precision-recall")
        ax.legend(loc="upper right", fontsize=8)
        save(fig, f"{c}_pr.png")
    for th in cfg["dist_ths"]:
        fig = Figure(figsize=(5, 4), layout="tight")
        ax = fig.subplots()
        for c in CLASSES:
            md = result.curves[(c, th)]
            ax.plot(md["recall"], md["precision"], label=f"{c}: {summary['label_aps'][c][th]:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="recall", ylabel="precision", title=f"all classes at {th} m")
        ax.legend(loc="upper right", fontsize=6)
        save(fig, f"dist_pr_{th}.png")
    return written


def format_summary(summary: dict) -> str:
    """The devkit's printed summary: mAP, the five mean TP errors, NDS, then AP and TP errors per class."""
    lines = [f"mAP: {summary['mean_ap']:.4f}"]
    lines += [f"{TP_SHORT[m]}: {summary['tp_errors'][m]:.4f}" for m in TP_METRICS]
    lines += [f"NDS: {summary['nd_score']:.4f}", f"Eval time: {summary['eval_time']:.1f}s"]
    ranges = summary.get("cfg", DETECTION_CVPR_2019)["class_range"]
    if ranges != DETECTION_CVPR_2019["class_range"]:
        lines.append(f"Class ranges capped at {max(ranges.values()):g} m: not the benchmark's (30-50 m)")
    lines += ["", "Per-class results:",
              "%-20s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s" % ("Object Class", "AP", "ATE", "ASE", "AOE", "AVE", "AAE")]
    tps = summary["label_tp_errors"]
    for c, ap in summary["mean_dist_aps"].items():
        lines.append("%-20s\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f" % (
            c, ap, tps[c]["trans_err"], tps[c]["scale_err"], tps[c]["orient_err"], tps[c]["vel_err"],
            tps[c]["attr_err"]))
    return "\n".join(lines)
