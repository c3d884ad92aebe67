"""The ``bevkit`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Bird's-eye-view perception from surround cameras and LiDAR on nuScenes-format data.",
)


class CliError(Exception):
    """An error to report on one line, with a non-zero exit."""


def _fail(message: str):
    raise CliError(message)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset to (absent or empty, or use --overwrite)."),
    preset: str = typer.Option("mini", help="tiny (tests), mini (mirrors v1.0-mini) or small (v1.0-trainval names)."),
    seed: int = typer.Option(0, help="World seed: the same seed writes the same dataset."),
    scale: float = typer.Option(None, help="Image size as a fraction of 1600x900 (default: the preset's)."),
    workers: int = typer.Option(None, help="Parallel scene workers (default: one per core)."),
    lidar_hz: int = typer.Option(None, "--lidar-hz", help="LiDAR sweep rate, 2, 4, 10 or 20 Hz (default 10)."),
    samples: int = typer.Option(None, help="Keyframes per scene (default: the preset's)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT (only once the new dataset is complete)."),
):
    """Write a synthetic nuScenes-format dataset: tables, camera JPEGs, LiDAR sweeps, maps, Occ3D labels."""
    from bevkit.data.synth import generate

    if workers is not None and workers < 1:
        _fail(f"--workers must be at least 1, got {workers}")
    try:
        summary = generate(out, preset=preset, seed=seed, scale=scale, workers=workers, lidar_hz=lidar_hz,
                           samples=samples, overwrite=overwrite)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary, indent=1))


@app.command()
def preview(
    root: Path = typer.Argument(..., help="Dataset root (holds <version>/, samples/, maps/)."),
    sample: str = typer.Option("0", help="Sample token, or index in (scene, time) order."),
    out: Path = typer.Option(Path("preview.png"), help="PNG to write."),
    version: str = typer.Option(None, help="Version folder (default: the only one under ROOT)."),
):
    """Draw one sample: six cameras with projected 3D boxes and a BEV of LiDAR, boxes and map."""
    from bevkit.data.nuscenes import DataError
    from bevkit.viz.preview import render_preview

    try:
        path = render_preview(root, sample, out, version=version)
    except DataError as e:
        _fail(str(e))
    typer.echo(str(path))


@app.command("check-data")
def check_data(
    root: Path = typer.Argument(..., help="Dataset root (holds <version>/, samples/, sweeps/, maps/)."),
    version: str = typer.Option(None, help="Version folder (default: the only one under ROOT)."),
    skip_files: bool = typer.Option(False, "--skip-files", help="Check the tables only, not the files."),
    max_problems: int = typer.Option(50, help="Print at most this many problems (all are counted; 0 prints none)."),
):
    """Validate a nuScenes-format dataset; exits 1 when it has an error, 2 when ROOT is not a dataset."""
    from bevkit.data.check import check_dataset
    from bevkit.data.nuscenes import DataError

    if max_problems < 0:
        _fail(f"--max-problems must be at least 0, got {max_problems}")
    try:
        rep = check_dataset(root, version, check_files=not skip_files, progress=True)
    except DataError as e:
        _fail(str(e))
    s = rep.summary
    if s:
        typer.echo(f"{rep.root} ({s['version']}): {s['scenes']} scenes, {s['samples']} samples, "
                   f"{s['sample_data']} sample_data, {s['annotations']} annotations, {s['instances']} instances; "
                   f"locations: {', '.join(s['locations'])}")
        typer.echo("annotations per class: " + ", ".join(f"{k} {v}" for k, v in s["annotations_per_class"].items()))
    for p in rep.problems[:max_problems]:
        typer.echo(str(p), err=True)
    if len(rep.problems) > max_problems:
        typer.echo(f"... and {len(rep.problems) - max_problems} more", err=True)
    n_err = len(rep.errors)
    typer.echo(f"{n_err} error(s), {len(rep.problems) - n_err} warning(s)")
    if n_err:
        raise typer.Exit(1)


@app.command()
def score(
    results: Path = typer.Argument(..., help="Results JSON in the official nuScenes detection format."),
    data: Path = typer.Option(..., "--data", help="Dataset root to score against."),
    version: str = typer.Option(None, help="Version folder (default: the only one under --data)."),
    split: str = typer.Option("val", help="Split whose samples the results cover (val, mini_val, ...)."),
    out: Path = typer.Option(None, help="Folder for metrics_summary.json, metrics_details.json and PR curves."),
    max_range: float = typer.Option(None, "--max-range", min=0.01,
                                    help="Cap every class range at this distance in m (not the benchmark; "
                                         "for models with a small BEV grid)."),
):
    """Score a detection results file from any tool with the nuScenes detection metrics (mAP, NDS)."""
    from bevkit.data.nuscenes import DataError
    from bevkit.eval import ResultsError
    from bevkit.eval.score import format_summary
    from bevkit.eval.score import score as run_score

    if not results.is_file():
        _fail(f"{results}: no such results file")
    _out_dir(out)
    try:
        summary = run_score(results, data, version, split, out, max_range=max_range)
    except (ResultsError, DataError) as e:
        _fail(str(e))
    typer.echo(format_summary(summary))
    if out is not None:
        typer.echo(f"wrote {out / 'metrics_summary.json'}")


def _out_dir(path: Path | None) -> None:
    """An output folder must be a folder or absent (checked before any work is done)."""
    if path is not None and path.exists() and not path.is_dir():
        _fail(f"{path}: exists and is not a folder; give a folder for the output")


def _out_file(path: Path) -> None:
    """An output file must not be a folder, and its folder must exist or be creatable."""
    if path.is_dir():
        _fail(f"{path}: is a folder; give a file name for the output")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        _fail(f"{parent}: is not a folder, so {path} cannot be written")


SET_HELP = "Override a config key, e.g. --set train.epochs=2 --set data.root=data/nuscenes (value read as YAML)."


def _engine_errors():
    from bevkit.config import ConfigError
    from bevkit.data.nuscenes import DataError
    from bevkit.engine.checkpoint import CheckpointError
    from bevkit.eval import ResultsError

    return (ConfigError, CheckpointError, DataError, ResultsError)


def _quiet_lightning() -> None:
    """Lightning's informational banners (GPU available, tips) off; its warnings stay."""
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment(config: Path, overrides: list[str]):
    from bevkit.config import load_experiment

    return load_experiment(config, overrides or [])


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML (configs/*.yaml)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, help="Continue from <out>/checkpoints/last.ckpt (same model config)."),
    overwrite: bool = typer.Option(False, help="Start afresh in a run folder that already holds checkpoints."),
):
    """Train a model: devices, precision, DDP, checkpoints and logs as the config's train section says."""
    _quiet_lightning()
    from bevkit.engine import train as run_train

    try:
        cfg = _experiment(config, set_)
        if resume and overwrite:
            _fail("--resume continues a run and --overwrite replaces it: give one of them")
        out = run_train(cfg, resume=resume, overwrite=overwrite)
    except _engine_errors() as e:
        _fail(str(e))
    typer.echo(f"run folder: {out} (checkpoints in {out / 'checkpoints'}, logs in {out / 'logs'})")


@app.command("eval")
def eval_(
    config: Path = typer.Argument(..., help="Experiment YAML the checkpoint was trained with."),
    ckpt: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by bevkit train."),
    split: str = typer.Option(None, help="Split to evaluate (default: the config's data.val_split)."),
    out: Path = typer.Option(None, help="Folder for the metrics files (default: <run>/eval-<split>)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Evaluate a checkpoint with every head's official metric; prints the nuScenes table, writes JSON."""
    _quiet_lightning()
    from bevkit.engine import evaluate

    _out_dir(out)
    try:
        cfg = _experiment(config, set_)
        metrics = evaluate(cfg, ckpt, split=split, out_dir=out)
    except _engine_errors() as e:
        _fail(str(e))
    _print_metrics(metrics)
    split = split or cfg.data.val_split
    typer.echo(f"wrote {out or Path(cfg.out) / f'eval-{split}'}")


def _print_metrics(metrics: dict) -> None:
    from bevkit.eval.score import format_summary

    if "detection" in metrics:
        typer.echo(format_summary(metrics["detection"]))
    for head in ("map", "occupancy"):
        if head in metrics:
            m = metrics[head]
            typer.echo(f"{head} IoU: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if not isinstance(v, dict)))
            if "map_prior" in m:
                p = m["map_prior"]
                typer.echo(f"map prior ({p['mode']}): {p['cells_before_evaluation']} cells before evaluation, "
                           f"{p['cells_after_evaluation']} after, {p['memory_MiB']:.1f} MiB")


@app.command()
def predict(
    config: Path = typer.Argument(..., help="Experiment YAML the checkpoint was trained with."),
    ckpt: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by bevkit train."),
    out: Path = typer.Option(Path("results_nusc.json"), help="Results JSON to write (official submission format)."),
    split: str = typer.Option(None, help="Split to predict (default: the config's data.val_split)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Write detections in the official nuScenes submission format (score it with `bevkit score`)."""
    _quiet_lightning()
    from bevkit.engine import predict as run_predict

    _out_file(out)
    try:
        cfg = _experiment(config, set_)
        sub = run_predict(cfg, ckpt, out, split=split)
    except _engine_errors() as e:
        _fail(str(e))
    n = sum(len(v) for v in sub["results"].values())
    typer.echo(f"wrote {out}: {len(sub['results'])} samples, {n} boxes")


@app.command()
def export(
    config: Path = typer.Argument(..., help="Experiment YAML the checkpoint was trained with."),
    ckpt: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by bevkit train (EMA weights if present)."),
    out: Path = typer.Option(Path("model.onnx"), help="ONNX file to write; its description goes beside it (+ .json)."),
    split: str = typer.Option(None, help="Split the example sample comes from (default: the config's data.val_split)."),
    sample: int = typer.Option(0, help="Index of the example sample in the split (its shapes fix the graph's)."),
    opset: int = typer.Option(None, help="ONNX opset (default: the exporter's)."),
    tolerance: float = typer.Option(1e-4, help="Largest accepted |onnx - torch| / max |torch| of any output."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Export a trained model to one ONNX graph of standard operators (no plugins) and check it in
    onnxruntime against PyTorch on two samples. Exit 1 if an output differs by more than --tolerance or
    a decoded box has no partner (the graph then goes to <out stem>.rejected.onnx)."""
    _quiet_lightning()
    import math

    from bevkit.export import export_onnx, load_trained

    _out_file(out)
    if sample < 0:
        _fail(f"--sample must be at least 0, got {sample}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        _fail(f"--tolerance must be a positive number, got {tolerance}")
    try:
        cfg = _experiment(config, set_)
        rep = export_onnx(cfg, load_trained(cfg, ckpt), out, split=split, sample=sample, opset=opset,
                          tolerance=tolerance)
    except _engine_errors() as e:
        _fail(str(e))
    written = out.with_name(rep["onnx"])
    typer.echo(f"wrote {written} ({rep['bytes'] / 2**20:.1f} MiB, opset {rep['opset']}, exported in "
               f"{rep['export_s']:.1f} s) and {written}.json")
    for i in rep["inputs"]:
        dyn = " (dim 0 dynamic)" if i["name"] in rep["dynamic"] else ""
        typer.echo(f"  input  {i['name']}: {tuple(i['shape'])} {i['dtype']}{dyn}")
    heads = sorted({o.split(".")[0] for o in rep["outputs"]})
    typer.echo(f"  outputs: {len(rep['outputs'])} ({', '.join(heads)}; names and shapes in {written}.json)")
    p = rep["parity"]
    first = p["per_sample"][0]
    typer.echo(f"onnxruntime vs PyTorch on {rep['sample']['split']} sample(s) {', '.join(map(str, p['samples']))}: "
               f"max |diff| / max |torch| = {p['max_rel_diff']:.1e} (tolerance {rep['tolerance']:.0e}); "
               f"{first['onnxruntime_s'] * 1e3:.0f} ms in onnxruntime, {first['torch_s'] * 1e3:.0f} ms in PyTorch")
    if any("decoded" in c for c in p["per_sample"]):
        n = sum(c["decoded"]["boxes_torch"] for c in p["per_sample"])
        cut = sum(c["decoded"]["at_cutoff"] for c in p["per_sample"])
        typer.echo(f"decoded boxes (PyTorch {n}): {p['decoded_unmatched']} without a partner, {cut} more at the "
                   "other side's score cut-off (ties at the box limit or threshold)")
    if not rep["ok"]:
        why = ("an output differs from PyTorch's by more than --tolerance" if not rep["raw_ok"] else
               "decoded boxes differ from PyTorch's (near-equal scores can swap NMS decisions in a barely "
               "trained model)")
        typer.echo(f"bevkit: error: {why}; the graph is in {written} for inspection"
                   + (f", {out} is unchanged" if written != out else ""), err=True)
        raise typer.Exit(1)


@app.command()
def bench(
    config: Path = typer.Argument(..., help="Experiment YAML (configs/*.yaml)."),
    ckpt: Path = typer.Argument(None, help="Checkpoint to load (default: the untrained model, seeded)."),
    split: str = typer.Option(None, help="Split the input samples come from (default: the config's data.val_split)."),
    sample: int = typer.Option(0, help="Index of the first input sample in the split."),
    batch: int = typer.Option(1, help="Samples per forward pass (consecutive samples of the split)."),
    repeats: int = typer.Option(20, help="Timed iterations (the figures are their median, min and max)."),
    warmup: int = typer.Option(3, help="Untimed iterations first."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    precision: str = typer.Option("32", help="32, bf16 (autocast) or 16 (float16 autocast, CUDA only)."),
    threads: int = typer.Option(None, help="torch intra-op threads on the CPU (default: torch's)."),
    flops: bool = typer.Option(True, help="Count the FLOPs of one forward pass (--no-flops to skip)."),
    out: Path = typer.Option(None, help="JSON report to write (default: <run>/bench.json)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Latency per stage, samples per second, peak memory, FLOPs and parameters of a model on dataset
    samples, as evaluation runs it (history frames, forward, decoding). Prints a table, writes JSON."""
    _quiet_lightning()
    import torch

    from bevkit.atomic import write_text_atomic
    from bevkit.bench import bench_input, bench_model
    from bevkit.engine.data import pick_device

    _check_device(device)
    if precision not in ("32", "bf16", "16"):
        _fail(f"--precision must be 32, bf16 or 16, got {precision!r}")
    if repeats < 1 or warmup < 0:
        _fail(f"--repeats must be at least 1 and --warmup at least 0, got {repeats} and {warmup}")
    if sample < 0 or batch < 1:
        _fail(f"--sample must be at least 0 and --batch at least 1, got {sample} and {batch}")
    if threads is not None and threads < 1:
        _fail(f"--threads must be at least 1, got {threads}")
    dev = pick_device(device)
    if precision == "16" and dev.type != "cuda":
        _fail("--precision 16 (float16 autocast) is CUDA only; use bf16 on the CPU")
    if out is not None:
        _out_file(out)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = _experiment(config, set_)
        if ckpt is None:
            from bevkit.engine.checkpoint import build_experiment_model

            torch.manual_seed(cfg.train.seed)
            model = build_experiment_model(cfg)
        else:
            from bevkit.export import load_trained

            model = load_trained(cfg, ckpt)
        model = model.to(dev).eval()
        split = split or cfg.data.val_split
        inputs, info = bench_input(cfg, model, split, sample, batch, dev)
        report = bench_model(model, inputs, repeats=repeats, warmup=warmup, precision=precision, flops=flops,
                             progress=sys.stderr.isatty())
    except _engine_errors() as e:
        _fail(str(e))
    report = {"config": str(config), "model": cfg.model.name, "checkpoint": None if ckpt is None else str(ckpt),
              "input": info, **report}
    out = out or Path(cfg.out) / "bench.json"
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    lat = report["latency_ms"]
    typer.echo(f"{cfg.model.name} on {report['device']} ({report['precision']}, {report['threads']} threads), "
               f"batch {report['batch']} of {split}, {repeats} runs after {warmup} warm-up")
    typer.echo(f"  {'stage':<22}{'median ms':>11}{'min ms':>9}{'share':>8}")
    for name, t in lat.items():
        share = "" if name == "total" else f"{100 * t['median'] / lat['total']['median']:7.1f}%"
        typer.echo(f"  {name:<22}{t['median']:11.2f}{t['min']:9.2f}{share:>8}")
    typer.echo(f"  {report['fps']:.2f} samples/s")
    mem = report["memory"]
    typer.echo(f"  peak memory: {mem['peak_mib']:.1f} MiB ({mem['kind']})"
               + (f"; process peak resident set {mem['process_peak_rss_mib']:.0f} MiB"
                  if mem["process_peak_rss_mib"] is not None else ""))
    if report["flops"] is not None:
        f = report["flops"]
        typer.echo(f"  {f['gflops']:.2f} GFLOPs per forward ({f['counted']:.2f} counted by torch's counter, sparse "
                   f"products {f['sparse_true']:.3f} as stored)")
    typer.echo(f"  {report['params_m']['total']:.2f} M parameters")
    typer.echo(f"wrote {out}")


@app.command()
def viz(
    config: Path = typer.Argument(..., help="Experiment YAML the checkpoint was trained with."),
    ckpt: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by bevkit train (EMA weights if present)."),
    split: str = typer.Option(None, help="Split the samples come from (default: the config's data.val_split)."),
    sample: list[int] = typer.Option(None, help="Index of a sample in the split (repeatable; default: 0)."),
    out: Path = typer.Option(None, help="Folder for the PNGs (default: <run>/viz-<split>)."),
    score_threshold: float = typer.Option(0.3, help="Draw predicted boxes scoring at least this."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Draw a trained model's predictions against the ground truth on dataset samples: boxes in the
    front camera and from above, each map layer, occupancy from above (one PNG per sample and head)."""
    _quiet_lightning()
    from bevkit.engine.data import pick_device
    from bevkit.export import load_trained
    from bevkit.viz.heads import visualise

    _check_device(device)
    _out_dir(out)
    samples = list(sample) if sample else [0]
    try:
        cfg = _experiment(config, set_)
        split = split or cfg.data.val_split
        out = out or Path(cfg.out) / f"viz-{split}"
        _out_dir(out)
        model = load_trained(cfg, ckpt).to(pick_device(device))
        paths = visualise(cfg, model, split, samples, out, score_threshold)
    except _engine_errors() as e:
        _fail(str(e))
    for path in paths:
        typer.echo(f"wrote {path}")


def _check_device(device: str) -> None:
    """``auto`` or a device torch knows and this machine has."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            _fail(f"--device {device}: no CUDA device on this machine (use auto or cpu)")
        if dev.index is not None and dev.index >= count:
            _fail(f"--device {device}: this machine has {count} CUDA device(s)")
    elif dev.type != "cpu":
        _fail(f"--device {device}: only auto, cpu and cuda devices are supported")


class _CacheGroup(TyperGroup):
    """``bevkit cache CONFIG CKPT ...`` is short for ``bevkit cache write CONFIG CKPT ...``; ``verify`` and
    ``merge`` are the other sub-commands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["write", *args]
        return super().parse_args(ctx, args)


cache_app = typer.Typer(
    cls=_CacheGroup, no_args_is_help=True, rich_markup_mode=None, add_completion=False,
    help="BEV feature cache: `bevkit cache CONFIG CKPT --split S --out DIR` (same as `cache write`), "
         "`bevkit cache verify DIR`, `bevkit cache merge DIR`. See docs/cache.md.")
app.add_typer(cache_app, name="cache")


@cache_app.command("write")
def cache_write(
    config: Path = typer.Argument(..., help="Experiment YAML the checkpoint was trained with."),
    ckpt: Path = typer.Argument(..., help="Checkpoint (.ckpt) written by bevkit train (EMA weights if present)."),
    out: Path = typer.Option(..., "--out", help="Cache folder (created; an interrupted job resumes into it)."),
    split: str = typer.Option(None, help="Split to cache (default: the config's data.val_split)."),
    dtype: str = typer.Option("float16", help="Storage dtype: float16, bfloat16 or float32."),
    shard: str = typer.Option(None, help="I/N: this process caches shard I (from 0) of N. Default: RANK/WORLD_SIZE "
                                         "from the environment under torchrun, else 0/1."),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per forward (default: data.eval_batch_size); "
                                                               "keep it when resuming or adding shards."),
    workers: int = typer.Option(None, help="DataLoader workers (default: data.workers)."),
    device: str = typer.Option("auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda, cuda:1, ..."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Run a trained model's BEV encoder over a split; store each sample's feature map (safetensors) and a
    manifest. Resumes: entries already written and verified are skipped. Exit 1 if any sample failed."""
    _quiet_lightning()
    from bevkit.cache import CacheError
    from bevkit.cache.writer import parse_shard, write_cache

    _out_dir(out)
    if batch_size is not None and batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        _fail(f"--workers must be at least 0, got {workers}")
    _check_device(device)
    try:
        where = parse_shard(shard) if shard is not None else None
        cfg = _experiment(config, set_)
        rep = write_cache(cfg, ckpt, out, split=split, dtype=dtype, shard=where, batch_size=batch_size,
                          workers=workers, device=device)
    except (*_engine_errors(), CacheError) as e:
        _fail(str(e))
    typer.echo(rep.summary())
    for f in rep.failed:
        typer.echo(f"failed: sample {f['token']} (split index {f['index']}): {f['reason']}", err=True)
    if rep.manifest is not None:
        typer.echo(f"wrote {rep.manifest} (every shard done)")
    else:
        typer.echo(f"wrote {out}/manifest.shard-{rep.shard[0]}-of-{rep.shard[1]}.json; manifest.json follows "
                   f"when every shard is done (or run `bevkit cache merge {out}`)")
    if rep.failed:
        raise typer.Exit(1)


@cache_app.command("verify")
def cache_verify(
    folder: Path = typer.Argument(..., metavar="DIR", help="Cache folder."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Check every entry's checksum against the manifest; exit 1 and list the bad entries if any."""
    from bevkit.cache import CacheError, verify

    try:
        rep = verify(folder, progress=progress)
    except CacheError as e:
        _fail(str(e))
    for b in rep.bad:
        typer.echo(f"bad: {b['file']} (sample {b['token']}): {b['reason']}", err=True)
    state = "" if rep.complete else " (unfinished: shard manifests only)"
    typer.echo(f"{rep.manifest}{state}: {rep.checked} entries checked, {len(rep.bad)} bad, "
               f"{rep.failed_samples} samples recorded as failed")
    if rep.bad:
        typer.echo("run the same `bevkit cache` command again to rewrite the bad entries", err=True)
        raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(folder: Path = typer.Argument(..., metavar="DIR", help="Cache folder holding shard manifests.")):
    """Merge the shard manifests of a cache into manifest.json (done automatically by the last shard)."""
    from bevkit.cache import CacheError, merge

    try:
        path = merge(folder)
    except CacheError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the demo's dataset and outputs."),
    preset: str = typer.Option("mini", help="Synthetic preset to build if the dataset is absent."),
    workers: int = typer.Option(None, help="Parallel scene workers for synthesis (default: one per core)."),
    epochs: int = typer.Option(None, help="Training epochs (default: the demo config's)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """The main job on the embedded default: synthesize the mini world (if absent), train a small LiDAR
    detector on mini_train, evaluate it (and the untrained model) on mini_val, draw predictions."""
    _quiet_lightning()
    from bevkit.engine.demo import run_demo

    try:
        run_demo(out, preset=preset, workers=workers, epochs=epochs, overrides=set_ or [], echo=typer.echo)
    except (*_engine_errors(), ValueError, FileExistsError) as e:
        _fail(str(e))


forecast_app = typer.Typer(
    no_args_is_help=True,
    help="Trajectory forecasting on cached BEV features: `bevkit forecast train`, `bevkit forecast eval`. "
         "See docs/forecast.md.")
app.add_typer(forecast_app, name="forecast")


@forecast_app.command("train")
def forecast_train_cmd(
    config: Path = typer.Argument(..., help="The experiment YAML whose model wrote the caches."),
    train_cache: Path = typer.Option(..., "--train-cache", help="BEV feature cache of the training split."),
    val_cache: Path = typer.Option(..., "--val-cache", help="BEV feature cache of the evaluation split."),
    out: Path = typer.Option(Path("runs/forecast"), help="Folder for forecaster.pt and metrics.json."),
    history_only: bool = typer.Option(False, "--history-only", help="The baseline: past trajectory only, no BEV."),
    epochs: int = typer.Option(20, help="Training epochs."),
    modes: int = typer.Option(10, help="Trajectory modes K."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine decay)."),
    batch_size: int = typer.Option(8, help="Samples per batch (all agents of each sample)."),
    seed: int = typer.Option(0, help="Seed of initialisation and shuffling."),
    history: int = typer.Option(4, help="Past keyframes besides the current one (4 = 2 s at 2 Hz)."),
    future: int = typer.Option(12, help="Future keyframes to predict (12 = 6 s at 2 Hz, the nuScenes setting)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """Train the multimodal forecaster (2 s history, 6 s future at 2 Hz) from a BEV feature cache."""
    import math

    from bevkit.cache import CacheError
    from bevkit.forecast.run import forecast_train

    for name, value in (("epochs", epochs), ("modes", modes), ("batch-size", batch_size), ("history", history),
                        ("future", future)):
        if value < 1:
            _fail(f"--{name} must be at least 1, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        _fail(f"--lr must be a positive number, got {lr}")
    if not 0 <= seed < 2**64:
        _fail(f"--seed must be from 0 to 2**64 - 1, got {seed}")
    try:
        cfg = _experiment(config, set_)
        m = forecast_train(cfg, train_cache, val_cache, out, history_only=history_only, epochs=epochs, modes=modes,
                           lr=lr, batch_size=batch_size, seed=seed, history=history, future=future)
    except (*_engine_errors(), CacheError) as e:
        _fail(str(e))
    _print_forecast(m["val"])
    typer.echo(f"wrote {out / 'forecaster.pt'} and {out / 'metrics.json'}")


@forecast_app.command("eval")
def forecast_eval_cmd(
    config: Path = typer.Argument(..., help="The experiment YAML whose model wrote the cache."),
    forecaster: Path = typer.Argument(..., help="forecaster.pt written by `bevkit forecast train`."),
    cache: Path = typer.Option(..., "--cache", help="BEV feature cache of the split to evaluate."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
):
    """minADE_k / minFDE_k (k = 1, 5, 10) and miss rate at 2 m, over all agents and turning agents."""
    from bevkit.cache import CacheError
    from bevkit.forecast.run import forecast_eval

    try:
        cfg = _experiment(config, set_)
        m = forecast_eval(cfg, forecaster, cache)
    except (*_engine_errors(), CacheError) as e:
        _fail(str(e))
    _print_forecast(m)


def _print_forecast(metrics: dict) -> None:
    for name, m in metrics.items():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "agents")
        typer.echo(f"{name} ({m['agents']} agents): {figures}")


INTERRUPTED = "bevkit: interrupted; nothing half-written was left in place"


def main(argv=None) -> int:
    """Entry point: bad input ends in one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        rc = app(args=argv, standalone_mode=False)
    except CliError as e:
        print(f"bevkit: error: {e}", file=sys.stderr)
        return 2
    except (typer.Exit, click.exceptions.Exit) as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except (typer.Abort, click.exceptions.Abort):
        print("bevkit: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except OSError as e:  # a path that cannot be read or written: the file system's own words, one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"bevkit: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Usage errors (bad option values, missing arguments) from the command-line parser, whichever
        # click it ships with: one line, exit code 2. Anything else is a bug and keeps its traceback.
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if getattr(e, "exit_code", 2) == 0:
                return 0
            if type(e).__name__ == "NoArgsIsHelpError":
                print(e.format_message(), file=sys.stderr)
                return 2
            print(f"bevkit: error: {e.format_message()}", file=sys.stderr)
            return 2
        raise
    if rc == 130:  # Ctrl-C, as typer returns it (click hands back an exit code without standalone mode)
        print(INTERRUPTED, file=sys.stderr)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
