"""``train``, ``evaluate`` and ``predict``: the Lightning trainer set up from an experiment config.

Run folder layout (``cfg.out``)::

    config.yaml                    the resolved config (also inside every checkpoint)
    checkpoints/last.ckpt          refreshed every epoch (and every ``checkpoint_every`` steps)
                                   (a folder with checkpoints is refused unless resume or overwrite)
    checkpoints/best-*.ckpt        best on the head's metric (NDS, map mIoU or occupancy mIoU)
    checkpoints/step*.ckpt         every ``checkpoint_every`` optimizer steps, if set
    logs/metrics.csv, tb/          CSV and TensorBoard logs
    eval-<split>/                  what ``evaluate`` writes
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from bevkit.atomic import interrupts_deferred, write_text_atomic
from bevkit.config import ConfigError, ExperimentConfig
from bevkit.data.nuscenes import DataError
from bevkit.engine.checkpoint import (
    CheckpointError,
    check_same_model,
    checked_state,
    checkpoint_config,
    init_weights,
    load_state,
    model_state,
    read_checkpoint,
)
from bevkit.engine.data import BEVDataModule
from bevkit.engine.module import BEVLitModule

PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16-mixed": "16-mixed"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same folder and renamed into place, so a
    kill mid-write never leaves a truncated ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with interrupts_deferred():  # Ctrl-C lands once the checkpoint is in place
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


class ConsumedBatches(Callback):
    """Tells the resumable train loader how many batches of the epoch were trained on, before any
    checkpoint of this batch is written (Lightning runs ``ModelCheckpoint`` hooks last)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = getattr(trainer.datamodule, "train_loader", None)
        if loader is not None:
            loader.consumed = batch_idx + 1


class LastCheckpoint(Callback):
    """Keeps ``last.ckpt`` current: at the end of every training epoch and, with ``every_n_steps``,
    after every N optimizer steps (mid-epoch, for ``--resume``). Written through the trainer, so on
    rank 0 only and atomically (``AtomicCheckpointIO``). Must come after ``ConsumedBatches``.

    A step checkpoint is written only where an optimizer step has just ended (never half-way through
    an accumulation), and never after an epoch's last batch: the epoch's validation runs before the
    epoch ends, and a run resumed from a position past every batch would skip it. A step due at the
    last batch is written one batch earlier instead (when that batch ended a step), and the epoch-end
    checkpoint follows the validation."""

    def __init__(self, path: Path, every_n_steps: int = 0):
        self.path = Path(path)
        self.every = every_n_steps
        self._saved_step = -1
        self._seen_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step  # restored on resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped, self._seen_step = step != self._seen_step, step  # this batch ended an optimizer step
        if not self.every or not stepped or step == self._saved_step or trainer.is_last_batch:
            return
        next_is_last = batch_idx + 2 == trainer.num_training_batches
        if step % self.every == 0 or (next_is_last and (step + 1) % self.every == 0):
            trainer.save_checkpoint(str(self.path))
            self._saved_step = step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(str(self.path))
        self._saved_step = trainer.global_step


def make_trainer(cfg: ExperimentConfig, out: Path, fit: bool, callbacks=(), progress: bool = True) -> L.Trainer:
    """The Lightning trainer for a config: devices, precision, DDP, clipping, accumulation, logs."""
    t = cfg.train
    if t.precision == "16-mixed" and not torch.cuda.is_available():
        raise ConfigError("train.precision: 16-mixed needs a CUDA device; use bf16 or 32 on the CPU")
    if t.threads:
        torch.set_num_threads(t.threads)
    cbs = [ConsumedBatches()] if fit else []  # first: the loader position is set before any checkpoint
    cbs += list(callbacks)
    if progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    loggers = False
    if fit:
        loggers = [CSVLogger(str(out), name="logs")]  # version_N: a resumed run never overwrites a log
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(out), name="tb", default_hp_metric=False))
        except ImportError:  # TensorBoard is optional; the CSV log is always written
            pass
        cbs.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=PRECISION[t.precision], max_epochs=t.epochs if t.epochs > 0 else -1, max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip, accumulate_grad_batches=t.accumulate, check_val_every_n_epoch=t.val_every,
        log_every_n_steps=t.log_every, deterministic="warn" if t.deterministic else False, use_distributed_sampler=False,
        num_sanity_val_steps=0, default_root_dir=str(out), logger=loggers, callbacks=cbs,
        enable_checkpointing=fit, enable_progress_bar=progress, enable_model_summary=fit,
        plugins=[AtomicCheckpointIO()])


def _check_resumable(model, ckpt: dict, path) -> None:
    """Refuse to resume a run whose saved tensors have other shapes than this version's model gives
    them (a layout changed since, e.g. BEVFormer's camera embedding): the weights could be upgraded
    on load, but the optimizer state could not."""
    own = model.state_dict()
    for key, value in model_state(ckpt, ema=False).items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} there and {tuple(own[key].shape)} "
                                  f"in this version's model, so its optimizer state cannot continue; start a new "
                                  f"run from its weights in another folder: --set out=<new folder> "
                                  f"--set train.init_from={path}")


def train(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          callbacks=()) -> Path:
    """Train a config into ``cfg.out``; with ``resume``, continue from ``checkpoints/last.ckpt``.

    A run folder that already holds checkpoints is refused unless ``resume`` (continue it) or
    ``overwrite`` (start afresh; its checkpoints are replaced as the new run writes them) is given, so
    that a second run never silently mixes with or replaces the first. Returns the run folder. The
    resolved config is written to ``config.yaml`` and into every checkpoint.
    """
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if resume:
        if not last.is_file():
            raise CheckpointError(f"{last}: nothing to resume from (no last checkpoint in the run folder)")
        ckpt = read_checkpoint(last)
        saved = checkpoint_config(last, ckpt)
        check_same_model(cfg, saved, last)
        if saved.data.train_split != cfg.data.train_split:  # the saved position counts batches of that split
            raise ConfigError(f"{last}: the run trained on data.train_split {saved.data.train_split!r}, not "
                              f"{cfg.data.train_split!r}; resume with the same split, or start a new run")
        ckpt_path = str(last)
    elif not overwrite and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(f"{out}: the run folder already holds checkpoints; pass --resume to continue that run, "
                          f"--overwrite to start afresh there, or choose another out")
    # The data first, so that a bad root or split changes nothing in the run folder.
    dm = BEVDataModule(cfg)
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)):
        if not dm.index.split(split):
            raise DataError(f"{cfg.data.root}: split {split!r} has no samples in this dataset")
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = BEVLitModule(cfg)
    if resume:
        _check_resumable(module.model, ckpt, last)
        del ckpt
    if cfg.train.init_from and not resume:
        fresh = init_weights(module.model, cfg.train.init_from)
        groups = sorted({k.split(".")[0] for k in fresh})
        if rank_zero_only.rank == 0:
            print(f"weights from {cfg.train.init_from}; {len(fresh)} tensors start fresh"
                  + (f" ({', '.join(groups)})" if groups else ""), flush=True)
    cbs = [LastCheckpoint(last, cfg.train.checkpoint_every),
           # best: judged after each validation only (never at a training epoch's end, where the
           # monitored metric does not exist and Lightning would warn)
           ModelCheckpoint(dirpath=str(ckpt_dir), monitor=module.monitor(), mode="max", save_top_k=1,
                           filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                           enable_version_counter=False, save_on_train_epoch_end=False)]
    if cfg.train.checkpoint_every:
        cbs.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_train_steps=cfg.train.checkpoint_every,
                                   filename="step{step:07d}", auto_insert_metric_name=False,
                                   enable_version_counter=False))
    trainer = make_trainer(cfg, out, fit=True, callbacks=[*cbs, *callbacks], progress=progress)
    if trainer.is_global_zero:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _interruptible(trainer, trainer.fit, module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return out


def _interruptible(trainer: L.Trainer, run, *args, **kwargs):
    """``run(*args, **kwargs)``, with Ctrl-C raised as ``KeyboardInterrupt``: Lightning catches it, tears
    down, then exits with code 1, which would hide the interruption from the caller."""
    try:
        return run(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def _load_for_eval(cfg: ExperimentConfig, ckpt_path, split: str, collect: bool) -> BEVLitModule:
    if ckpt_path is None:  # the untrained model, initialised with the config's seed (a baseline)
        L.seed_everything(cfg.train.seed, verbose=False)
        return BEVLitModule(cfg, eval_split=split, collect_results=collect)
    state = checked_state(cfg, ckpt_path)
    module = BEVLitModule(cfg, eval_split=split, collect_results=collect)
    load_state(module.model, state, ckpt_path)
    return module


def _validate(cfg, module, split, progress) -> L.Trainer:
    trainer = make_trainer(cfg, Path(cfg.out), fit=False, progress=progress)
    _interruptible(trainer, trainer.validate, module, datamodule=BEVDataModule(cfg, eval_split=split), verbose=False)
    return trainer


def evaluate(cfg: ExperimentConfig, ckpt_path, split: str | None = None, out_dir=None,
             progress: bool = True, plots: bool = True) -> dict:
    """Every head's official metrics on ``split`` (default ``data.val_split``) of the checkpoint's weights
    (its EMA if it has one; ``ckpt_path`` None: the untrained model), written to ``out_dir``
    (default ``<run>/eval-<split>``) on rank 0: ``metrics_summary.json`` / ``metrics_details.json`` / PR
    plots (detection), ``map_metrics.json``, ``occupancy_metrics.json``.

    Returns ``{"detection": metrics_summary dict, "map": {...}, "occupancy": {...}}`` (heads present).
    """
    from bevkit.eval.score import _jsonable, write_outputs

    split = split or cfg.data.val_split
    module = _load_for_eval(cfg, ckpt_path, split, collect=False)
    start = time.time()
    trainer = _validate(cfg, module, split, progress)
    seconds = time.time() - start
    out = Path(out_dir) if out_dir is not None else Path(cfg.out) / f"eval-{split}"
    metrics = {}
    if "detection" in module.results:
        result = module.results["detection"]
        summary = dict(result.summary)
        summary["eval_time"] = seconds  # inference and metrics, as the devkit's figure covers its own work
        summary["meta"] = {"split": split, "checkpoint": None if ckpt_path is None else str(ckpt_path)}
        metrics["detection"] = summary
        if trainer.is_global_zero:
            write_outputs(result, summary, out, plots=plots)
    for head in ("map", "occupancy"):
        if head in module.results:
            metrics[head] = module.results[head]
            if trainer.is_global_zero:
                write_text_atomic(out / f"{head}_metrics.json", json.dumps(_jsonable(metrics[head]), indent=2))
    return metrics


def predict(cfg: ExperimentConfig, ckpt_path, out_file, split: str | None = None, progress: bool = True) -> dict:
    """The official nuScenes detection submission (``meta`` + ``results`` per sample token) for ``split``,
    written atomically to ``out_file`` on rank 0. Returns the submission dict."""
    if cfg.model.heads.boxes() is None:
        raise ConfigError("predict: the model has no detection head; `bevkit eval` scores map and occupancy")
    split = split or cfg.data.val_split
    module = _load_for_eval(cfg, ckpt_path, split, collect=True)
    trainer = _validate(cfg, module, split, progress)
    m = cfg.model
    submission = {"meta": {"use_camera": m.view_transform is not None, "use_lidar": m.lidar is not None,
                           "use_radar": False, "use_map": False, "use_external": m.backbone.checkpoint is not None},
                  "results": module.submission}
    if trainer.is_global_zero:
        write_text_atomic(Path(out_file), json.dumps(submission))
    return submission
