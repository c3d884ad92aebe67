"""Training and evaluating the forecaster on a split's agents, with BEV features from any source.

A feature source maps a sample token to its BEV feature map (C, Y, X): the on-disk cache
(``bevkit.cache``), an in-memory dict, or ``EncoderFeatures`` which runs a BEV model on the fly
(what the cache saves). Items are samples (one BEV map, all its agents), so each map is read once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bevkit.atomic import interrupts_deferred, write_text_atomic
from bevkit.forecast.model import Forecaster, displacement_metrics
from bevkit.forecast.tracks import AgentTracks, turning

FORECAST_SCHEMA = 1


class ForecastDataset(Dataset):
    """One item per sample that has agents: its agents' tracks and, with ``features``, its BEV map."""

    def __init__(self, tracks: AgentTracks, features: Mapping | None = None):
        self.tracks = tracks
        self.features = features
        order = np.argsort(tracks.sample, kind="stable")
        samples, starts = np.unique(tracks.sample[order], return_index=True)
        self.groups = np.split(order, starts[1:]) if len(order) else []
        self.samples = samples
        self.turning = turning(tracks)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        rows = self.groups[i]
        t = self.tracks
        token = t.tokens[int(self.samples[i])]
        item = {"token": token, "history": torch.from_numpy(t.history[rows]),
                "history_valid": torch.from_numpy(t.history_valid[rows]), "future": torch.from_numpy(t.future[rows]),
                "pose": torch.from_numpy(t.pose[rows]), "label": torch.from_numpy(t.label[rows]),
                "turning": torch.from_numpy(self.turning[rows])}
        if self.features is not None:
            item["bev"] = self.features[token]
        return item


def collate_forecast(items: list[dict]) -> dict:
    """Agents of all items concatenated, with ``agent_sample`` pointing at their item's BEV map."""
    out = {k: torch.cat([it[k] for it in items]) for k in ("history", "history_valid", "future", "pose", "label",
                                                           "turning")}
    out["agent_sample"] = torch.cat([torch.full((len(it["label"]),), i, dtype=torch.long)
                                     for i, it in enumerate(items)])
    out["token"] = [it["token"] for it in items]
    if "bev" in items[0]:
        out["bev"] = torch.stack([torch.as_tensor(it["bev"]) for it in items])
    return out


class EncoderFeatures(Mapping):
    """BEV features computed on the fly by a BEV model (the work the cache saves): ``token -> (C, Y, X)``."""

    def __init__(self, module, dataset):
        self.module = module  # a BEVLitModule in eval mode
        self.dataset = dataset  # its HistoryDataset over the split
        self.pos = {s["token"]: i for i, s in enumerate(dataset.base.samples)}

    def __getitem__(self, token):
        from bevkit.engine.data import collate_history

        batch = collate_history([self.dataset[self.pos[token]]])
        with torch.no_grad():
            return self.module.run(batch)["features"][0]

    def __iter__(self):
        return iter(self.pos)

    def __len__(self):
        return len(self.pos)


def mirror_agents(batch: dict, generator: torch.Generator) -> dict:
    """Training augmentation: each agent mirrored about its own x axis with probability 1/2 (its past,
    its future and, through ``mirror``, its BEV patch), which doubles the layouts a forecaster sees."""
    flip = torch.rand(len(batch["label"]), generator=generator) < 0.5
    sign = torch.ones(len(flip), 1, 2)
    sign[flip, :, 1] = -1.0
    return dict(batch, history=batch["history"] * sign, future=batch["future"] * sign, mirror=flip)


def build_forecaster(config: dict) -> Forecaster:
    return Forecaster(**config)


def evaluate_forecaster(model: Forecaster, loader: DataLoader, progress: bool = False) -> dict:
    """minADE_k, minFDE_k (k = 1, 5, 10) and miss rate at 2 m over all agents, over the agents that move
    more than 2 m in the 6 s, and over those that turn (``tracks.turning``)."""
    model.eval()
    totals: dict[str, dict] = {"all": {}, "moving": {}, "turning": {}}
    with torch.no_grad():
        for batch in tqdm(loader, desc="forecast eval", disable=not progress, leave=False):
            out = model(batch)
            moving = batch["future"][:, -1].norm(dim=-1) > 2.0
            for name, sel in (("all", None), ("moving", moving), ("turning", batch["turning"])):
                if sel is not None:
                    if not sel.any():
                        continue
                    part = {"trajectories": out["trajectories"][sel], "logits": out["logits"][sel]}
                    fut = batch["future"][sel]
                else:
                    part, fut = out, batch["future"]
                for k, v in displacement_metrics(part, fut).items():
                    totals[name][k] = totals[name].get(k, 0) + v
    result = {}
    for name, t in totals.items():
        n = t.pop("count", 0)
        result[name] = {"agents": n, **{k: (v / n if n else math.nan) for k, v in sorted(t.items())}}
    return result


def train_forecaster(model: Forecaster, train_ds: ForecastDataset, val_ds: ForecastDataset | None, epochs: int,
                     out_dir, lr: float = 1e-3, batch_size: int = 8, seed: int = 0, progress: bool = True,
                     workers: int = 0, mirror: bool = True, info: dict | None = None) -> dict:
    """AdamW with cosine decay; writes ``forecaster.pt`` (weights-only loadable) and ``metrics.json`` to
    ``out_dir`` (with ``info`` added to the metrics). Returns {"val": metrics, "step_seconds": mean seconds
    per step, **info}."""
    torch.manual_seed(seed)
    # Mirroring flips the BEV patch's rows, which is the mirror image only for a patch centred on the agent.
    mirror = mirror and (not model.bev_channels or abs(model.extent[2] + model.extent[3]) < 1e-9)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_forecast,
                        num_workers=workers)
    with torch.no_grad():  # materialise lazy layers before the optimiser sees the parameters
        model(collate_forecast([train_ds[0]]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    step_time, steps = 0.0, 0
    bar = tqdm(total=total, desc="forecast train", disable=not progress)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            t0 = time.perf_counter()
            if mirror:
                batch = mirror_agents(batch, g)
            terms = model.loss(model(batch), batch["future"])
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            sched.step()
            step_time += time.perf_counter() - t0
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
    bar.close()
    metrics = {"step_seconds": step_time / max(steps, 1)}
    if val_ds is not None:
        metrics["val"] = evaluate_forecaster(model, DataLoader(val_ds, batch_size=batch_size,
                                                               collate_fn=collate_forecast), progress)
    metrics.update(info or {})
    save_forecaster(model, out_dir / "forecaster.pt")
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def forecaster_config(model: Forecaster) -> dict:
    return {"modes": model.modes, "bev_channels": model.bev_channels, "bounds": list(model.bounds),
            "extent": list(model.extent), "cells": list(model.cells), "history": model.history_len,
            "future": model.future, "hidden": model.hidden, "dropout": model.dropout,
            "pool": model.pool}


def save_forecaster(model: Forecaster, path) -> None:
    """Weights and config in one file, written atomically; loads with ``weights_only=True``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    doc = {"schema": FORECAST_SCHEMA, "config": forecaster_config(model), "state_dict": model.state_dict()}
    if getattr(model, "trained_on", None):  # the features it learnt from: checkpoint, dtype, config hash
        doc["trained_on"] = dict(model.trained_on)
    with interrupts_deferred():  # see bevkit.atomic.interrupts_deferred
        torch.save(doc, tmp)
        os.replace(tmp, path)


def load_forecaster(path) -> Forecaster:
    from bevkit.engine.checkpoint import CheckpointError

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise CheckpointError(f"{path}: not a readable forecaster checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != FORECAST_SCHEMA:
        raise CheckpointError(f"{path}: not a bevkit forecaster checkpoint")
    try:
        model = build_forecaster(ckpt["config"])
        if model.bev_channels:
            with torch.no_grad():  # materialise the lazy layer before loading
                model.patch(torch.zeros(1, model.bev_channels, *model.cells))
        model.load_state_dict(ckpt["state_dict"])
        model.trained_on = dict(ckpt["trained_on"]) if "trained_on" in ckpt else None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: forecaster config or weights do not fit this bevkit: {first}") from None
    return model.eval()
