"""``CachedFeatures``: a ``Dataset`` of cached BEV features (memory-mapped) with each sample's annotations."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from bevkit.cache.entry import DTYPES, EntryError, open_entry, read_header
from bevkit.cache.manifest import (
    CacheError,
    config_hash,
    feature_config,
    grid_record,
    load_manifest,
    tokens_sha256,
    value_differences,
)
from bevkit.config import ExperimentConfig
from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.data.nuscenes import CATEGORY_TO_CLASS, NuScenesIndex

# Annotation keys served with the features (the sample's ego frame, no augmentation).
ANNOTATIONS = ("scene", "timestamp", "prev", "next", "ego_from_lidar", "global_from_ego", "boxes", "labels",
               "num_lidar_pts", "attributes", "instances")


def check_manifest(manifest: dict, cfg: ExperimentConfig, where, dtype: str | None = None,
                   checkpoint_sha256: str | None = None) -> None:
    """Refuse a cache that does not match ``cfg`` (and ``dtype`` / a checkpoint's sha256 when given): raises
    ``CacheError`` naming the folder and what differs, grid first, then dtype, checkpoint, config keys."""
    grid = grid_record(cfg)
    if manifest["grid"] != grid:
        diff = value_differences(manifest["grid"], grid, "grid")
        raise CacheError(f"{where}: the cache's BEV grid differs from the config's (cache vs config): "
                         + "; ".join(diff))
    if dtype is not None and manifest["dtype"] != dtype:
        raise CacheError(f"{where}: the cache holds {manifest['dtype']} features, {dtype} was asked for")
    if checkpoint_sha256 is not None and manifest["checkpoint"]["sha256"] != checkpoint_sha256:
        raise CacheError(f"{where}: written with another checkpoint (sha256 {manifest['checkpoint']['sha256'][:12]}... "
                         f"of {manifest['checkpoint']['path']}, not {checkpoint_sha256[:12]}...)")
    if manifest["config_hash"] != config_hash(cfg):
        diff = value_differences(manifest["config"], feature_config(cfg), "config")
        shown = "; ".join(d.removeprefix("config.") for d in diff[:6]) + ("; ..." if len(diff) > 6 else "")
        raise CacheError(f"{where}: written for another config (config hash {manifest['config_hash'][:12]}... vs "
                         f"{config_hash(cfg)[:12]}...); differs at (cache vs config) {shown}")


def check_dataset(manifest: dict, index: NuScenesIndex, where) -> None:
    """Refuse a cache written from another dataset than ``index``'s: raises ``CacheError`` naming the folder
    and both datasets (root, version, identity) when the version or the tables' identity differ, or naming
    the sample when an entry's token is not at its recorded index of the manifest's split."""
    d = manifest["dataset"]
    if index.version != d["version"] or index.identity != d["identity"]:
        raise CacheError(f"{where}: written from another dataset ({d['version']} at {d['root']}, identity "
                         f"{d['identity']}) than {index.root} ({index.version}, identity {index.identity}): "
                         f"its tables differ")
    samples = index.split(d["split"])
    if len(samples) != d["samples"] or tokens_sha256([s["token"] for s in samples]) != d["tokens_sha256"]:
        raise CacheError(f"{where}: split {d['split']!r} of {index.root} is not the one cached: {len(samples)} "
                         f"samples now, {d['samples']} when the cache was written (splits.json changed?)")
    position = {s["token"]: i for i, s in enumerate(samples)}
    for rec in manifest["entries"]:
        if position.get(rec["token"]) != rec["index"]:
            raise CacheError(f"{where}: sample {rec['token']} is not at index {rec['index']} of split "
                             f"{d['split']!r} in {index.root}")


class CachedFeatures(Dataset):
    """The samples of a finished cache: each item is the sample's cached BEV feature map and its annotations.

    The cache must match ``cfg`` (grid, dtype if given, config hash, checkpoint if given) and, when
    annotations are served or ``index`` is given, the dataset ``cfg.data`` points to (version, table
    identity and each entry's position in the split, ``check_dataset``): otherwise ``CacheError`` names
    what differs. ``index``: the ``NuScenesIndex`` of ``cfg.data``'s dataset if the caller has it (it is
    loaded when annotations are served); ``annotations=False`` without ``index`` reads no dataset and
    checks none. Samples that failed when caching are not served; they are listed in ``self.failed``.

    Each item:
        token (str), index (position in the split)
        features (C, Y, X) in the stored dtype, memory-mapped copy-on-write (zero-copy; pages are read
        when touched); ego frame, on the grid of ``manifest["grid"]``
        with ``annotations``: scene, timestamp, prev, next, ego_from_lidar (4, 4), global_from_ego (4, 4)
        float64, boxes (M, 9) ego (x, y, z, l, w, h, yaw, vx, vy), labels (M,), num_lidar_pts (M,),
        attributes and instances (lists of M str)
    ``verify=True`` also checks each entry's checksum as it is read (reads the whole file).
    """

    def __init__(self, cache_dir, cfg: ExperimentConfig, dtype: str | None = None, checkpoint=None,
                 annotations: bool = True, verify: bool = False, index: NuScenesIndex | None = None):
        self.dir = Path(cache_dir)
        self.manifest = load_manifest(self.dir)
        if dtype is not None and dtype not in DTYPES:
            raise CacheError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        ckpt_sha = None
        if checkpoint is not None:
            from bevkit.engine.checkpoint import file_sha256

            ckpt_sha = file_sha256(checkpoint)
        check_manifest(self.manifest, cfg, self.dir, dtype, ckpt_sha)
        self.cfg = cfg
        self.entries = self.manifest["entries"]
        self.failed = self.manifest["failed"]
        self.shape = tuple(self.manifest["shape"] or ())
        self.verify = verify
        self.samples: NuScenesDataset | None = None
        if annotations and index is None:
            index = NuScenesIndex.load(cfg.data.root, cfg.data.version)
        if index is not None:  # read against a dataset: it must be the one the cache was written from
            check_dataset(self.manifest, index, self.dir)
        if annotations:
            cmap = dict(cfg.data.class_map) if cfg.data.class_map is not None else dict(CATEGORY_TO_CLASS)
            dc = DataConfig(cameras=(), load_points=False, category_map=cmap)
            self.samples = NuScenesDataset(index.root, self.manifest["dataset"]["split"], dc, index=index)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, k: int) -> dict:
        rec = self.entries[k]
        path = self.dir / rec["file"]
        try:
            if self.verify:
                from bevkit.cache.entry import verify_entry

                info = verify_entry(path, rec["token"], self.manifest["cache_id"], rec["sha256"],
                                    self.manifest["dtype"], self.shape)
            else:
                info = read_header(path)
                if info.token != rec["token"] or info.cache_id != self.manifest["cache_id"] or info.shape != self.shape:
                    raise EntryError(f"{path}: header does not match the manifest (run `bevkit cache verify`)")
            features = open_entry(path, info)
        except EntryError as e:
            raise CacheError(str(e)) from None
        item = {"token": rec["token"], "index": rec["index"], "features": features}
        if self.samples is not None:
            sample = self.samples.load(rec["index"])
            item.update({key: sample[key] for key in ANNOTATIONS})
        return item


def collate_cached(items: list[dict]) -> dict:
    """Batch ``CachedFeatures`` items: ``features`` (B, C, Y, X), ``global_from_ego`` / ``ego_from_lidar``
    (B, 4, 4) stacked; variable-length annotations stay lists."""
    batch = collate(items)
    batch["features"] = torch.stack(batch["features"])
    return batch
