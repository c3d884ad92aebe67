"""The LightningModule: a thin shell around the plain ``BEVModel`` (loss, optimiser, schedule, EMA,
evaluation with the official metrics of every head the model has)."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from tqdm import tqdm

import bevkit
from bevkit.config import ExperimentConfig, Schedule
from bevkit.data.nuscenes import NuScenesTables
from bevkit.engine.checkpoint import build_experiment_model
from bevkit.eval.detection import detection_config
from bevkit.eval.evaluator import (
    DetectionEvaluator,
    boxes_to_results,
    gather_detections,
)
from bevkit.eval.groundtruth import load_detection_gt
from bevkit.eval.map_seg import MapIoU
from bevkit.eval.occupancy import OccupancyMIoU
from bevkit.models.map_prior import MapPriorMemory

CHECKPOINT_SCHEMA = 1


def lr_factor(step: int, total: int, s: Schedule) -> float:
    """The schedule's multiplier of the base learning rate at optimiser step ``step`` of ``total``."""
    total = max(total, 1)
    if step < s.warmup_steps:
        warm = s.warmup_ratio + (1.0 - s.warmup_ratio) * step / s.warmup_steps
    else:
        warm = 1.0
    t = min(step / total, 1.0)
    if s.type == "constant":
        f = 1.0
    elif s.type == "step":
        f = s.gamma ** sum(t >= m for m in s.milestones)
    elif s.type == "cosine":
        f = s.final + (1.0 - s.final) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # cyclic: cosine up to peak, cosine down to final
        if t < s.up_fraction:
            u = t / s.up_fraction
            f = s.peak + (1.0 - s.peak) * 0.5 * (1.0 + math.cos(math.pi * u))
        else:
            u = (t - s.up_fraction) / max(1.0 - s.up_fraction, 1e-9)
            f = s.final + (s.peak - s.final) * 0.5 * (1.0 + math.cos(math.pi * u))
        return f * (warm if step < s.warmup_steps else 1.0)
    return f * warm


def with_history(model, batch: dict) -> dict:
    """The batch with ``prev_bev`` set: its history frames (``batch["history"]``, if any) encoded by
    ``model.encode`` without gradient, the state a temporal model reads.

    Shapes:
        returns: the batch plus prev_bev (B, T-1, C_bev, Y, X), ego frames of the history keyframes
    """
    if "history" not in batch:
        return batch
    with torch.no_grad():
        prev = [model.encode(h)[0] for h in batch["history"]]
    return dict(batch, prev_bev=torch.stack(prev, dim=1))


def global_from_bev(batch: dict) -> Tensor:
    """The pose of each sample's BEV frame (the ego frame after the BEV augmentation ``bev_aug``) in the
    global frame: ``global_from_ego @ inv(bev_aug)``, in float64.

    Shapes:
        returns: (B, 4, 4)
    """
    g = batch["global_from_ego"].double()
    aug = batch.get("bev_aug")
    if aug is None:
        return g
    return g @ torch.linalg.inv(aug.to(g))


class BEVLitModule(L.LightningModule):
    """Training and evaluation of one ``BEVModel``.

    Evaluation (``trainer.validate`` or the validation of ``fit``) runs every head's official metric
    over the whole split: nuScenes detection (``DetectionEvaluator``), map IoU, Occ3D mIoU. With an EMA
    the averaged weights are evaluated. After an evaluation, ``self.results`` holds
    ``{"detection": DetectionResult, "map": {...}, "occupancy": {...}}`` and, if ``collect_results``,
    ``self.submission`` the official results-format boxes per sample token.

    With a map prior (Neural Map Prior), two global map memories are kept beside the model: one for
    training, emptied at the start of every training epoch, and one for evaluation, emptied at the start
    of every evaluation and filled online in the split's (scene, time) order, so a sample reads only
    what earlier samples of the split wrote. Neither is differentiated through or saved in checkpoints.
    """

    def __init__(self, cfg: ExperimentConfig, eval_split: str | None = None, collect_results: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = build_experiment_model(cfg)
        self.eval_split = eval_split or cfg.data.val_split
        self.collect_results = collect_results
        self.ema: dict[str, Tensor] | None = None
        self._gt = None
        self._backup: dict[str, Tensor] | None = None
        self.results: dict = {}
        self.submission: dict[str, list] = {}
        self.memories: dict[str, MapPriorMemory] = {}

    # ---- forward ---------------------------------------------------------------------------------

    def memory(self, stage: str) -> MapPriorMemory:
        """The global map memory of ``stage`` ("train" or "eval"), created empty on first use."""
        if stage not in self.memories:
            mp, grid = self.cfg.model.map_prior, self.cfg.model.grid
            channels = self.model.map_prior.pos.shape[1]
            self.memories[stage] = MapPriorMemory(channels, grid.xbound[2], mp.tile, getattr(torch, mp.memory_dtype),
                                                  self.device)
        return self.memories[stage]

    def run(self, batch: dict, stage: str = "eval") -> dict:
        """The model on a collated batch; history frames (if any) are encoded first, without gradient.
        With a map prior, the prior is read from the ``stage`` memory and the model's update written back
        (in evaluation with ``eval.map_prior: empty``, the prior is empty and nothing is written)."""
        batch = with_history(self.model, batch)
        if self.model.map_prior is None or (stage == "eval" and self.cfg.eval.map_prior == "empty"):
            return self.model(batch)
        memory, grid = self.memory(stage), self.cfg.model.grid.spec()
        poses = global_from_bev(batch)
        prior, _ = memory.read(batch["location"], poses, grid, device=self.device)
        out = self.model(dict(batch, map_prior=prior))
        memory.write(batch["location"], poses, grid, out["map_prior_update"])
        return out

    # ---- training --------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        if "train" in self.memories:
            self.memories["train"].reset()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.run(batch, "train")
        terms = self.model.loss(out, batch)
        bs = len(batch["token"])
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", batch_size=bs)
        return terms["loss"]

    def configure_optimizers(self):
        t = self.cfg.train
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)  # norms and biases take no weight decay
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=t.lr)
        elif t.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=t.lr)
        else:
            opt = torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
        total = self.total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, t.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimizer steps of the whole run, from the split size, batch size, processes and accumulation.

        Computed without building the train loader (Lightning's ``estimated_stepping_batches`` would build
        it before a resumed checkpoint is restored, and the loader's position would be lost)."""
        t, trainer = self.cfg.train, self.trainer
        n = self.trainer.datamodule.train_samples()
        batches = math.ceil(math.ceil(n / trainer.world_size) / self.cfg.data.batch_size)
        per_epoch = math.ceil(batches / t.accumulate)
        total = per_epoch * t.epochs if t.epochs > 0 else t.max_steps
        return min(total, t.max_steps) if t.max_steps > 0 else total

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.cfg.train.ema is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        state = self.model.state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in state.items()}
            return
        first = next(iter(state.values()))
        if next(iter(self.ema.values())).device != first.device:  # restored from a checkpoint on the CPU
            self.ema = {k: v.to(first.device) for k, v in self.ema.items()}
        # MEGVII's ramp (as BEVDet): the decay grows with the step count, so early averages are not stale.
        step = self.global_step
        d = self.cfg.train.ema * (1 - math.exp(-step / 2000.0)) if step < 20000 else self.cfg.train.ema
        for k, v in state.items():
            if v.dtype.is_floating_point:
                self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.ema[k].copy_(v)

    # ---- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bevkit"] = {"schema": CHECKPOINT_SCHEMA, "version": bevkit.__version__,
                                "config": self.cfg.to_dict()}
        if self.ema is not None:
            checkpoint["ema"] = {k: v.detach().cpu().clone() for k, v in self.ema.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema = {k: v.to(self.device) for k, v in checkpoint["ema"].items()}

    # ---- evaluation ------------------------------------------------------------------------------

    def _detection_gt(self):
        if self._gt is None:
            tables = NuScenesTables(self.cfg.data.root, self.cfg.data.version)
            self._gt = load_detection_gt(tables, self.eval_split)
        return self._gt

    def _swap_ema(self) -> None:
        if self.ema is None:
            return
        state = self.model.state_dict()
        if self._backup is None:
            self._backup = {k: v.detach().clone() for k, v in state.items()}
            self.model.load_state_dict({k: v.to(state[k].device) for k, v in self.ema.items()})
        else:
            self.model.load_state_dict(self._backup)
            self._backup = None

    def on_validation_epoch_start(self) -> None:
        if "eval" in self.memories:
            self.memories["eval"].reset()
        self._swap_ema()
        if self.model.map_prior is not None and self.cfg.eval.map_prior == "train":
            self._fill_memory_from_train()
        self._prior_cells = self.memories["eval"].observed_cells() if "eval" in self.memories else 0
        heads = self.cfg.model.heads
        self._det = (DetectionEvaluator(self._detection_gt(), detection_config(self.cfg.eval.max_range))
                     if heads.boxes() is not None else None)
        self._map = MapIoU(tuple(heads.map.classes)) if heads.map is not None else None
        self._occ = OccupancyMIoU() if heads.occupancy is not None else None
        self.submission = {}

    @torch.no_grad()
    def _fill_memory_from_train(self) -> None:
        """Fill the evaluation memory with the training drives (``eval.map_prior: train``): the model
        runs over the whole training split, each scene in time order, writing its updates, as a map
        prior built from earlier drives would be before the evaluated ones."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None or not hasattr(dm, "prior_dataloader"):
            raise RuntimeError("eval.map_prior: train needs the BEVDataModule's training split")
        was_training = self.model.training
        self.model.eval()
        for batch in tqdm(dm.prior_dataloader(), desc="map prior from the train split", leave=False,
                          disable=not self.trainer.is_global_zero):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            self.run(batch, "eval")
        self.model.train(was_training)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if all(batch.get("filler", [False])):  # a rank without scenes of its own (see SceneSampler)
            return
        if any(batch.get("filler", [False])):
            raise RuntimeError("evaluation batch mixes filler and real samples")
        out = self.run(batch)
        preds = self.model.decode(out)
        if self._det is not None:
            names = self.cfg.model.heads.boxes().attributes
            for i, det in enumerate(preds["detection"]):
                attrs = ["" if a < 0 else names[a] for a in det["attributes"].tolist()]
                boxes = det["boxes"].float().cpu()
                self._det.add(batch["token"][i], boxes, det["scores"].float().cpu(), det["labels"].cpu(), attrs)
                if self.collect_results:
                    self.submission[batch["token"][i]] = boxes_to_results(
                        batch["token"][i], boxes, det["scores"].float().cpu(), det["labels"].cpu(),
                        batch["global_from_ego"][i].cpu().numpy(), attrs)
        if self._map is not None:
            self._map.update(preds["map"].cpu(), batch["map"].bool().cpu())
        if self._occ is not None:
            target = batch["occupancy"]
            occ = self.model.heads["occupancy"].decode_to(out["occupancy"], target.shape[1:])
            self._occ.update(occ.cpu(), target.cpu(), batch["mask_camera"].cpu())

    def on_validation_epoch_end(self) -> None:
        self.results = {}
        if self._det is not None:
            gather_detections(self._det)
            result = self._det.compute()
            self.results["detection"] = result
            s = result.summary
            self.log("val/mAP", float(s["mean_ap"]), sync_dist=False, rank_zero_only=False)
            self.log("val/NDS", float(s["nd_score"]), sync_dist=False)
            self.log("val/mAVE", float(s["tp_errors"]["vel_err"]), sync_dist=False)
        if self._map is not None:
            m = self._map.sync().compute()
            if self.model.map_prior is not None:  # what the prior held (this process's memory)
                memory = self.memories.get("eval")
                m["map_prior"] = {"mode": self.cfg.eval.map_prior, "cells_before_evaluation": self._prior_cells,
                                  "cells_after_evaluation": memory.observed_cells() if memory is not None else 0,
                                  "memory_MiB": memory.nbytes() / 2**20 if memory is not None else 0.0}
            self.results["map"] = m
            self.log("val/map_mIoU", float(m["mIoU"]), sync_dist=False)
        if self._occ is not None:
            o = self._occ.sync().compute()
            self.results["occupancy"] = o
            self.log("val/occ_mIoU", float(o["mIoU"]), sync_dist=False)
        if self.collect_results and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.submission)
            merged: dict = {}
            for p in parts:
                merged.update(p)
            self.submission = merged
        self._swap_ema()

    def monitor(self) -> str:
        """The metric that picks the best checkpoint (higher is better)."""
        heads = self.cfg.model.heads
        if heads.boxes() is not None:
            return "val/NDS"
        return "val/map_mIoU" if heads.map is not None else "val/occ_mIoU"

