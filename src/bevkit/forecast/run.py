"""``bevkit forecast train|eval``: the forecaster on cached BEV features (or the history-only baseline)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader

from bevkit.config import ExperimentConfig
from bevkit.data.nuscenes import NuScenesIndex
from bevkit.forecast.model import Forecaster
from bevkit.forecast.tracks import FUTURE, HISTORY, build_tracks
from bevkit.forecast.train import (
    ForecastDataset,
    collate_forecast,
    evaluate_forecaster,
    load_forecaster,
    train_forecaster,
)


class CachedFeatureMap(Mapping):
    """``token -> (C, Y, X)`` over a finished BEV feature cache (memory-mapped entries, no encoder).

    The agents come from ``cfg.data``'s dataset, so the cache must have been written from it (same tables
    and split positions, ``bevkit.cache.reader.check_dataset``): otherwise ``CacheError``. ``index``: that
    dataset's ``NuScenesIndex`` if already loaded (else loaded here); kept as ``self.index``.
    """

    def __init__(self, cache_dir, cfg: ExperimentConfig, index: NuScenesIndex | None = None):
        from bevkit.cache.reader import CachedFeatures

        self.index = index or NuScenesIndex.load(cfg.data.root, cfg.data.version)
        self.cached = CachedFeatures(cache_dir, cfg, annotations=False, index=self.index)
        if not self.cached.entries:
            from bevkit.cache.manifest import CacheError

            failed = len(self.cached.manifest.get("failed", []))
            raise CacheError(f"{cache_dir}: the cache holds no feature map ({failed} samples failed when it was "
                             "written; `bevkit cache verify` lists them)")
        self.split = self.cached.manifest["dataset"]["split"]
        self.pos = {rec["token"]: k for k, rec in enumerate(self.cached.entries)}

    def __getitem__(self, token):
        return self.cached[self.pos[token]]["features"]

    def __iter__(self):
        return iter(self.pos)

    def __len__(self):
        return len(self.pos)


def _dataset(cfg: ExperimentConfig, features: Mapping | None, split: str, history: int, future: int,
             index: NuScenesIndex | None = None) -> ForecastDataset:
    index = index or NuScenesIndex.load(cfg.data.root, cfg.data.version)
    tracks = build_tracks(index, split, cfg.data.class_map, history=history, future=future)
    if features is not None:  # agents of samples that failed to cache are left out (the manifest lists them)
        keep = [tracks.tokens[s] in features for s in tracks.sample]
        tracks = tracks.take(keep)
    if len(tracks) == 0:
        from bevkit.data.nuscenes import DataError

        raise DataError(f"split {split!r} of {cfg.data.root} has no agent with {future} future keyframes")
    return ForecastDataset(tracks, features)


def feature_source(cached) -> dict:
    """What produced a cache's features: the checkpoint's sha256, the storage dtype and the config hash."""
    m = cached.manifest
    return {"checkpoint_sha256": m["checkpoint"]["sha256"], "dtype": m["dtype"], "config_hash": m["config_hash"]}


def _same_source(a: dict, b: dict, what: str) -> None:
    from bevkit.cache.manifest import CacheError

    diff = [f"{k} {str(a.get(k))[:12]} vs {str(b.get(k))[:12]}" for k in ("checkpoint_sha256", "dtype", "config_hash")
            if a.get(k) != b.get(k)]
    if diff:
        raise CacheError(f"{what}: the features come from another model or storage ({'; '.join(diff)})")


def grid_bounds(cfg: ExperimentConfig) -> tuple[float, float, float, float]:
    (x0, x1, _), (y0, y1, _) = cfg.model.grid.xbound, cfg.model.grid.ybound
    return (x0, x1, y0, y1)


def forecast_train(cfg: ExperimentConfig, train_cache, val_cache, out, history_only: bool = False, epochs: int = 20,
                   modes: int = 10, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                   history: int = HISTORY, future: int = FUTURE, progress: bool = True) -> dict:
    """Train on the agents of ``train_cache``'s split (features from the cache unless ``history_only``)
    and evaluate on ``val_cache``'s split. Returns the metrics also written to ``out/metrics.json``.

    Both caches must match ``cfg`` and its dataset (``CacheError`` otherwise, even with ``history_only``);
    a split without an agent with ``future`` keyframes ahead is a ``DataError``."""
    feats_train = CachedFeatureMap(train_cache, cfg)
    feats_val = CachedFeatureMap(val_cache, cfg, feats_train.index)
    if not history_only:  # one model's features to learn from and to be scored on
        _same_source(feature_source(feats_train.cached), feature_source(feats_val.cached),
                     f"--train-cache {train_cache} and --val-cache {val_cache}")
    train_ds = _dataset(cfg, None if history_only else feats_train, feats_train.split, history, future,
                        feats_train.index)
    val_ds = _dataset(cfg, None if history_only else feats_val, feats_val.split, history, future, feats_val.index)
    channels = 0 if history_only else int(feats_train.cached.shape[0])
    torch.manual_seed(seed)
    model = Forecaster(modes=modes, bev_channels=channels, bounds=grid_bounds(cfg), history=history, future=future)
    model.trained_on = None if history_only else feature_source(feats_train.cached)
    info = {"train_agents": len(train_ds.tracks), "val_agents": len(val_ds.tracks),
            "variant": "history-only" if history_only else "bev"}
    return train_forecaster(model, train_ds, val_ds, epochs, out, lr=lr, batch_size=batch_size, seed=seed,
                            progress=progress, info=info)


def forecast_eval(cfg: ExperimentConfig, forecaster_path, cache, batch_size: int = 8, progress: bool = True) -> dict:
    """minADE / minFDE / miss rate of a trained forecaster on the agents of ``cache``'s split."""
    model = load_forecaster(forecaster_path)
    feats = CachedFeatureMap(cache, cfg)
    if model.bev_channels:
        from bevkit.engine.checkpoint import CheckpointError

        channels, bounds = int(feats.cached.shape[0]), tuple(float(b) for b in grid_bounds(cfg))
        if model.bev_channels != channels or tuple(float(b) for b in model.bounds) != bounds:
            raise CheckpointError(f"{forecaster_path}: trained on {model.bev_channels}-channel features over grid "
                                  f"bounds {model.bounds}, but the cache holds {channels} channels over {bounds}")
        if model.trained_on:  # forecasters saved before this was recorded are not checked
            _same_source(model.trained_on, feature_source(feats.cached), f"{forecaster_path} and --cache {cache}")
    ds = _dataset(cfg, feats if model.bev_channels else None, feats.split, model.history_len, model.future,
                  feats.index)
    return evaluate_forecaster(model, DataLoader(ds, batch_size=batch_size, collate_fn=collate_forecast), progress)
