"""Data for the engine: history frames, a scene-aware distributed sampler, a resumable loader, and
the Lightning data module.

Evaluation on several processes must give exactly the single-process numbers, so the evaluation
sampler gives each process whole scenes, in order, and never pads with duplicates. Training
shuffles samples with a seed and the epoch, splits them evenly over processes (wrapping around so
that every process steps the same number of times), and can resume mid-epoch: the loader reports
how many batches were consumed and skips them after a restart.
"""

from __future__ import annotations

import hashlib
import math
import os

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bevkit.config import ExperimentConfig
from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.data.nuscenes import CATEGORY_TO_CLASS, NuScenesIndex
from bevkit.geometry import inverse
from bevkit.geometry.grid import BEVGrid


def history_frames(cfg: ExperimentConfig) -> int:
    """Previous keyframes a model reads: ``temporal.frames - 1`` for BEVDet4D, 1 for BEVFormer."""
    m = cfg.model
    if m.temporal is not None:
        return m.temporal.frames - 1
    if m.view_transform is not None and m.view_transform.type == "deform":
        return 1
    return 0


def data_config(cfg: ExperimentConfig, train: bool) -> DataConfig:
    """The reader's ``DataConfig`` for a model: targets of its heads; augmentation, and leaving out
    boxes without points (``train.drop_empty_boxes``), only in training."""
    d, m = cfg.data, cfg.model
    cameras = tuple(d.cameras) if m.view_transform is not None else ()  # a LiDAR-only model reads no image
    kw = dict(cameras=cameras, image_size=tuple(d.image_size), sweeps=d.sweeps,
              sweep_min_distance=d.sweep_min_distance,
              load_points=m.lidar is not None or (m.view_transform is not None
                                                  and (m.view_transform.depth_loss_weight > 0
                                                       or m.view_transform.type == "lss_depth")),
              occupancy=m.heads.occupancy is not None)
    if d.class_map is not None:
        kw["category_map"] = dict(d.class_map)
    else:
        kw["category_map"] = dict(CATEGORY_TO_CLASS)
    if m.heads.map is not None:  # the map raster at the head's resolution over the model's grid
        u = m.heads.map.upsample
        (x0, x1, dx), (y0, y1, dy) = m.grid.xbound, m.grid.ybound
        kw["map_grid"] = BEVGrid(xmin=x0, xmax=x1, ymin=y0, ymax=y1, dx=dx / u, dy=dy / u)
        kw["map_classes"] = tuple(m.heads.map.classes)
    if train:
        kw["img_aug"] = cfg.image_aug()
        kw["bev_aug"] = cfg.bev_aug()
        kw["drop_empty_boxes"] = cfg.train.drop_empty_boxes
    return DataConfig(**kw)


class HistoryDataset(Dataset):
    """A split's samples, each with ``history`` previous keyframes of its scene (most recent first).

    A history frame shares its current frame's augmentation; at the start of a scene the current frame
    stands in for missing ones (BEVDet4D's convention). Each item gains ``history`` (list of T-1 sample
    dicts) and ``curr_from_prev`` (T-1, 4, 4): the (augmented) ego frame of each history frame to the
    current one.
    """

    def __init__(self, base: NuScenesDataset, history: int):
        self.base = base
        self.history = history

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        """``key``: an index, or ``(index, epoch)`` as ``SceneSampler`` yields it (augmentations are drawn
        from (seed, epoch, index), so they do not depend on which worker process loads the sample)."""
        i, epoch, filler = (*key, False)[:3] if isinstance(key, tuple) else (key, self.base.epoch, False)
        self.base.set_epoch(epoch)
        item = self.base.load(i)
        item["filler"] = filler
        if self.history == 0:
            return item
        frames, transforms = [], []
        j, before_start = i, False
        aug = item["bev_aug"].double().numpy()
        curr = item["global_from_ego"].numpy()
        for _ in range(self.history):
            # Past the scene's first keyframe (or a sample missing from the split) every slot is the
            # current frame, as BEVDet's get_adj_info fills them.
            prev = None if before_start else self.base.samples[j]["prev"]
            k = self.base.position(prev) if prev else None
            before_start = k is None
            j = i if before_start else k
            # A stand-in copy of the current frame carries the same keys as a loaded frame (no "filler"),
            # so that history frames of scene starts and of later samples collate together.
            h = {key: v for key, v in item.items() if key != "filler"} if j == i else self.base.load(j, aug_key=i)
            frames.append(h)
            m = aug @ inverse(curr) @ h["global_from_ego"].numpy() @ np.linalg.inv(aug)
            transforms.append(m)
        item["history"] = frames
        item["curr_from_prev"] = torch.tensor(np.array(transforms), dtype=torch.float32)
        return item


def collate_history(items: list[dict]) -> dict:
    """``collate``, with ``history`` collated frame by frame (a list of T-1 batches)."""
    history = [it.pop("history", None) for it in items]
    batch = collate(items)
    if history[0] is not None:
        batch["history"] = [collate([h[t] for h in history]) for t in range(len(history[0]))]
        batch["curr_from_prev"] = torch.stack(batch["curr_from_prev"])
    return batch


def to_device(batch, device: torch.device):
    """A collated batch (tensors inside dicts, lists and tuples) moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def pick_device(device: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    return torch.device("cpu")


def scene_runs(scenes: list[str]) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive equal scene names."""
    runs, start = [], 0
    for i in range(1, len(scenes) + 1):
        if i == len(scenes) or scenes[i] != scenes[start]:
            runs.append((start, i))
            start = i
    return runs


def split_scenes_over_ranks(scenes: list[str], world: int) -> list[list[int]]:
    """Whole scenes per rank, in order, balanced by sample count; every sample exactly once.

    Contiguous blocks of scenes: rank r takes the scenes whose samples fall in the r-th of ``world``
    equal shares of the split (by each scene's first sample).
    """
    runs = scene_runs(scenes)
    n = len(scenes)
    out: list[list[int]] = [[] for _ in range(world)]
    for start, stop in runs:
        mid = (start + stop) / 2
        r = min(world - 1, int(mid * world / max(n, 1)))
        out[r].extend(range(start, stop))
    return out


class SceneSampler(Sampler[int]):
    """Sample indices for one process.

    ``shuffle=False`` (evaluation): the rank's whole scenes in split order (``split_scenes_over_ranks``);
    ranks may get different counts, and together they cover the split exactly once (a rank left
    without a scene gets one filler sample, marked ``filler`` in the batch, that evaluation skips).
    ``shuffle=True`` (training): a permutation seeded by (seed, epoch), split evenly over ranks, the
    last ranks wrapping around to the start so all have ``ceil(n / world)``.
    ``shuffle=True, time_order=True`` (training with a map prior, as Neural Map Prior trains): the scenes
    in a permutation seeded by (seed, epoch), each scene's samples in time order, cut into ``world``
    contiguous runs of ``ceil(n / world)`` (wrapping around), one per rank.
    ``skip``: indices to leave out at the start of the next pass (mid-epoch resume); reset after it.
    Yields ``(index, epoch)`` so that the dataset draws the epoch's augmentation in any worker.
    """

    def __init__(self, scenes: list[str], shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 time_order: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.scenes = list(scenes)
        self.shuffle = shuffle
        self.time_order = time_order
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        n = len(self.scenes)
        if not self.shuffle:
            return split_scenes_over_ranks(self.scenes, self.world)[self.rank]
        rng = np.random.default_rng([self.seed, self.epoch])
        per = math.ceil(n / self.world)
        if self.time_order:  # samples are in (scene, time) order: permute whole scenes
            starts = [i for i in range(n) if i == 0 or self.scenes[i] != self.scenes[i - 1]] + [n]
            runs = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
            order = [i for k in rng.permutation(len(runs)).tolist() for i in runs[k]]
            order = (order * (1 + (per * self.world) // max(n, 1)))[: per * self.world]
            return order[self.rank * per:(self.rank + 1) * per]
        order = rng.permutation(n).tolist()
        order = (order * (1 + (per * self.world) // max(n, 1)))[: per * self.world]
        return order[self.rank:: self.world]

    def __iter__(self):
        idx = self.indices()
        skip, self.skip = self.skip, 0
        if not idx and not self.shuffle and self.scenes:
            # More processes than scenes: this rank evaluates one filler sample that the metrics skip,
            # so that every process takes part in the collective gather at the end.
            return iter([(0, self.epoch, True)])
        return iter([(i, self.epoch) for i in idx[skip:]])

    def __len__(self) -> int:
        n = len(self.indices())
        return n if n or self.shuffle or not self.scenes else 1


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a ``SceneSampler`` whose position Lightning saves in checkpoints.

    ``consumed`` (batches of the current epoch that were trained on) is set by the engine after each
    batch; ``load_state_dict`` makes the next pass skip them, so a resumed run sees exactly the batches
    an uninterrupted one would.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "consumed": int(self.consumed), "batch_size": int(self.batch_size),
                "world": int(self.sampler.world), "samples": len(self.sampler.scenes), "scenes": self._scenes_digest()}

    def _scenes_digest(self) -> str:
        """Digest of the split's samples as scene names in order (a changed splits.json shows)."""
        return hashlib.sha256("\n".join(self.sampler.scenes).encode()).hexdigest()[:12]

    def load_state_dict(self, state: dict) -> None:
        now = {"batch_size": self.batch_size, "world": self.sampler.world, "samples": len(self.sampler.scenes),
               "scenes": self._scenes_digest()}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
        if changed:  # the saved position counts batches of the old layout: it cannot be mapped exactly
            from bevkit.config import ConfigError

            raise ConfigError("resume: the checkpoint's position in the epoch was saved with another data layout ("
                              + ", ".join(changed) + "); resume with the same data.batch_size, number of "
                              "processes and split, or start a new run")
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = consumed * self.batch_size
        self.consumed = consumed


class BEVDataModule(L.LightningDataModule):
    """Train and evaluation loaders of an experiment; the index is built once and shared."""

    def __init__(self, cfg: ExperimentConfig, eval_split: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.eval_split = eval_split or cfg.data.val_split
        self.history = history_frames(cfg)
        self._index: NuScenesIndex | None = None
        self.train_loader: ResumableLoader | None = None

    @property
    def index(self) -> NuScenesIndex:
        if self._index is None:
            self._index = NuScenesIndex.load(self.cfg.data.root, self.cfg.data.version)
        return self._index

    def train_samples(self) -> int:
        """Samples in the training split."""
        return len(self.index.split(self.cfg.data.train_split))

    def dataset(self, split: str, train: bool) -> HistoryDataset:
        base = NuScenesDataset(self.cfg.data.root, split, data_config(self.cfg, train), index=self.index,
                               seed=self.cfg.train.seed)
        return HistoryDataset(base, self.history)

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds: HistoryDataset, shuffle: bool, batch_size: int, cls=DataLoader) -> DataLoader:
        rank, world = self._rank_world()
        scenes = [ds.base.index.scenes[s["scene_token"]]["name"] for s in ds.base.samples]
        order = self.cfg.train.order
        time_order = order == "scenes" or (order == "auto" and self.cfg.model.map_prior is not None)
        sampler = SceneSampler(scenes, shuffle=shuffle, seed=self.cfg.train.seed, rank=rank, world=world,
                               time_order=time_order)
        workers = self.cfg.data.workers
        return cls(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_history,
                   persistent_workers=workers > 0, worker_init_fn=_worker_init,
                   pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> ResumableLoader:
        ds = self.dataset(self.cfg.data.train_split, train=True)
        self.train_loader = self._loader(ds, True, self.cfg.data.batch_size, ResumableLoader)
        return self.train_loader

    def prior_dataloader(self) -> DataLoader:
        """The training split without augmentation, every scene in time order, for filling an
        evaluation map-prior memory (``eval.map_prior: train``); every process reads all of it."""
        ds = self.dataset(self.cfg.data.train_split, train=False)
        scenes = [ds.base.index.scenes[s["scene_token"]]["name"] for s in ds.base.samples]
        workers = self.cfg.data.workers
        return DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, num_workers=workers,
                          sampler=SceneSampler(scenes, shuffle=False), collate_fn=collate_history,
                          worker_init_fn=_worker_init)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.eval_split, train=False), False, self.cfg.data.eval_batch_size)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding and rasterising in workers must not fight the model for cores
