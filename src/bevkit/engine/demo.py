"""``bevkit demo``: synthesize (if absent) -> preview -> train -> evaluate -> draw, on the embedded config."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import yaml

from bevkit.config import apply_overrides, experiment_from_dict


def demo_config(out: Path, data: Path, epochs: int | None = None, overrides=()):
    """The embedded demo experiment (``bevkit/engine/demo.yaml``) with its data and run folders under ``out``."""
    doc = yaml.safe_load(resources.files("bevkit.engine").joinpath("demo.yaml").read_text())
    doc["data"]["root"] = str(data)
    doc["out"] = str(out / "train")
    if epochs is not None:
        doc["train"]["epochs"] = epochs
    return experiment_from_dict(apply_overrides(doc, overrides), "demo config")


def demo_picks(root, version, split: str, per_scene: int = 2) -> list[str]:
    """Sample tokens to draw: evenly spaced keyframes of every scene of the split."""
    from bevkit.data.nuscenes import NuScenesIndex

    index = NuScenesIndex.load(root, version)
    picks, by_scene = [], {}
    for s in index.split(split):
        by_scene.setdefault(s["scene_token"], []).append(s["token"])
    for tokens in by_scene.values():
        picks += [tokens[(2 * k + 1) * len(tokens) // (2 * per_scene)] for k in range(per_scene)]
    return picks


def run_demo(out, preset: str = "mini", workers: int | None = None, epochs: int | None = None, overrides=(),
             echo=print) -> dict:
    """Run the whole demo; returns ``{"untrained": summary, "trained": summary}`` (detection metrics).

    Writes under ``out``: ``synth-<preset>/`` (the dataset, reused when present), ``preview.png``,
    ``train/`` (the run folder: config, checkpoints, logs), ``train/eval-mini_val/`` (the trained model's
    ``metrics_summary.json`` as ``bevkit eval`` writes it, with PR curves), ``untrained/`` (the same
    for the untrained model), ``predictions/`` (PNGs of predictions against ground truth) and
    ``demo_summary.json``.
    """
    from bevkit.atomic import write_text_atomic
    from bevkit.data.synth import generate
    from bevkit.engine.runner import evaluate, predict, train
    from bevkit.eval.score import format_summary
    from bevkit.viz.predictions import render_predictions
    from bevkit.viz.preview import render_preview

    start = time.time()
    out = Path(out)
    data = out / f"synth-{preset}"
    if not (data.is_dir() and any(data.glob("*/sample.json"))):
        echo(f"[demo] 1/5 synthesizing the {preset} world into {data}")
        generate(data, preset=preset, workers=workers, overwrite=data.exists())
    else:
        echo(f"[demo] 1/5 using the dataset in {data}")
    echo(f"[demo] 2/5 preview: {render_preview(data, 0, out / 'preview.png')}")
    cfg = demo_config(out, data, epochs, overrides)
    split = cfg.data.val_split
    echo(f"[demo] 3/5 training {cfg.model.name} on {cfg.data.train_split} for {cfg.train.epochs} epochs "
         f"into {cfg.out}")
    run = train(cfg, overwrite=True)  # the demo owns its run folder: a rerun retrains from scratch
    last = run / "checkpoints" / "last.ckpt"
    echo(f"[demo] 4/5 evaluating on {split}: untrained, then trained")
    untrained = evaluate(cfg, None, split=split, out_dir=out / "untrained", plots=False)["detection"]
    trained = evaluate(cfg, last, split=split)["detection"]
    echo(format_summary(trained))
    sub = predict(cfg, last, run / f"results_{split}.json", split=split, progress=False)
    picks = demo_picks(data, cfg.data.version, split)
    pngs = render_predictions(data, sub["results"], picks, out / "predictions", score_threshold=0.2)
    echo(f"[demo] 5/5 drew {len(pngs)} samples into {out / 'predictions'}")
    summary = {
        "minutes": round((time.time() - start) / 60, 2), "config": cfg.to_dict(),
        "untrained": {"mAP": untrained["mean_ap"], "NDS": untrained["nd_score"]},
        "trained": {"mAP": trained["mean_ap"], "NDS": trained["nd_score"], "mAVE": trained["tp_errors"]["vel_err"]},
    }
    write_text_atomic(out / "demo_summary.json", json.dumps(summary, indent=1))
    echo(f"[demo] {split}: untrained mAP {untrained['mean_ap']:.4f} NDS {untrained['nd_score']:.4f} -> "
         f"trained mAP {trained['mean_ap']:.4f} NDS {trained['nd_score']:.4f} "
         f"({summary['minutes']:.1f} min; metrics in {run / f'eval-{split}' / 'metrics_summary.json'})")
    return {"untrained": untrained, "trained": trained}
