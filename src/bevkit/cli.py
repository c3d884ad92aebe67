"""The ``bevkit`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import typer

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
    max_problems: int = typer.Option(50, help="Print at most this many problems (all are counted)."),
):
    """Validate a nuScenes-format dataset; exits non-zero when anything is wrong."""
    from bevkit.data.check import check_dataset

    rep = check_dataset(root, version, check_files=not skip_files, progress=True)
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
):
    """Score a detection results file from any tool with the nuScenes detection metrics (mAP, NDS)."""
    from bevkit.data.nuscenes import DataError
    from bevkit.eval import ResultsError
    from bevkit.eval.score import format_summary
    from bevkit.eval.score import score as run_score

    if not results.is_file():
        _fail(f"{results}: no such results file")
    try:
        summary = run_score(results, data, version, split, out)
    except (ResultsError, DataError) as e:
        _fail(str(e))
    typer.echo(format_summary(summary))
    if out is not None:
        typer.echo(f"wrote {out / 'metrics_summary.json'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the demo's dataset and outputs."),
    preset: str = typer.Option("mini", help="Synthetic preset to build if the dataset is absent."),
    workers: int = typer.Option(None, help="Parallel scene workers (default: one per core)."),
):
    """The main job on the embedded default: synthesize the mini world (if absent) and preview it."""
    from bevkit.data.synth import generate
    from bevkit.viz.preview import render_preview

    data = out / f"synth-{preset}"
    if not (data.is_dir() and any(data.glob("*/sample.json"))):
        typer.echo(f"[demo] synthesizing the {preset} world into {data}")
        try:
            generate(data, preset=preset, workers=workers, overwrite=data.exists())
        except (ValueError, FileExistsError) as e:
            _fail(str(e))
    else:
        typer.echo(f"[demo] using the dataset in {data}")
    png = render_preview(data, 0, out / "preview.png")
    typer.echo(f"[demo] wrote {png}")


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
        print("bevkit: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
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
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
