"""``write_cache``: a trained model's BEV features over a split, one entry per sample, sharded and resumable.

How a job runs (shard ``i`` of ``n``):

1. The split's samples are cut into batches of ``batch_size`` in split order, and shard ``i`` takes the
   ``i``-th of ``n`` contiguous blocks of those batches. A sample is therefore always computed in the same
   batch, whatever the sharding and whatever was already written, so the features (and their bytes) do
   not depend on how the job was split or interrupted.
2. Entries already in ``entries/`` are verified from their own header and checksum; valid ones are
   skipped, anything else (torn, altered, another cache's) is recomputed. Stale temporary files of
   this shard's samples are removed.
3. Each remaining batch is loaded (a sample that fails to load is recorded with the reason, not
   skipped silently), run through the model's BEV encoder (``BEVModel.encode`` + ``features``, history
   frames first for temporal models), cast to the storage dtype and written entry by entry (temporary
   name, then rename).
4. ``manifest.shard-i-of-n.json`` is written; if every shard is then done, the shards are merged into
   ``manifest.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bevkit.cache.entry import (
    DTYPES,
    TMP_MARK,
    EntryError,
    entry_name,
    verify_entry,
    write_entry,
)
from bevkit.cache.manifest import (
    ENTRIES,
    CacheError,
    existing_identity,
    identity_differences,
    make_header,
    merge,
    shard_file,
    tokens_sha256,
    write_json_atomic,
)
from bevkit.config import ExperimentConfig
from bevkit.data.nuscenes import DataError
from bevkit.engine.checkpoint import check_same_model, file_sha256, load_model
from bevkit.engine.data import BEVDataModule, collate_history, pick_device, to_device
from bevkit.engine.module import with_history

# Loading a sample can fail on bad input in these ways; anything else is a bug and stops the job.
LOAD_ERRORS = (DataError, OSError, ValueError)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    i, sep, n = text.partition("/")
    try:
        shard, shards = int(i), int(n)
    except ValueError:
        raise CacheError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered from 0)") from None
    if not sep or shards < 1 or not 0 <= shard < shards:
        raise CacheError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return shard, shards


def shard_from_env() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` under torchrun / SLURM-style launchers, else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return (rank, world) if world > 1 else (0, 1)


def shard_batches(samples: int, batch_size: int, shard: int, shards: int) -> list[list[int]]:
    """The batches (lists of split indices) of one shard: the ``shard``-th of ``shards`` contiguous blocks
    of the split's batches, so that batches are the same for any number of shards."""
    batches = [list(range(k, min(k + batch_size, samples))) for k in range(0, samples, batch_size)]
    nb = len(batches)
    return [b for k, b in enumerate(batches) if k * shards // max(nb, 1) == shard]


class _Guarded(Dataset):
    """The split's samples; a sample that cannot be loaded becomes ``{"index", "token", "error"}``."""

    def __init__(self, ds, tokens: list[str]):
        self.ds = ds
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        try:
            item = self.ds[i]
        except LOAD_ERRORS as e:
            return {"index": i, "token": self.tokens[i], "error": f"{type(e).__name__}: {e}"}
        item["index"] = i
        return item


def _collate(items: list[dict]) -> tuple[dict | None, list[dict]]:
    failed = [it for it in items if "error" in it]
    ok = [it for it in items if "error" not in it]
    return (collate_history(ok) if ok else None), failed


@torch.inference_mode()
def bev_features(model, batch: dict) -> torch.Tensor:
    """The BEV encoder output every head reads (``BEVModel.forward(batch)["features"]`` without the heads).

    Shapes:
        returns: (B, C_enc, Y, X) on the model's ego-frame grid
    """
    batch = with_history(model, batch)
    bev, _ = model.encode(batch)
    return model.features(bev, batch)


@dataclass
class CacheReport:
    """What one shard run did."""

    out: Path
    shard: tuple[int, int]
    samples: int = 0  # in this shard
    written: int = 0
    skipped: int = 0  # already cached and verified
    rewritten: int = 0  # found invalid (torn, altered) and written again; counted in ``written``
    failed: list[dict] = field(default_factory=list)  # {index, token, reason}
    bytes_written: int = 0
    seconds: float = 0.0
    manifest: Path | None = None  # manifest.json when this run completed the cache

    def summary(self) -> str:
        i, n = self.shard
        line = (f"shard {i}/{n}: {self.samples} samples: written {self.written}, skipped {self.skipped} "
                f"(already cached), failed {len(self.failed)}")
        if self.rewritten:
            line += f"; {self.rewritten} invalid entries were rewritten"
        return line + f" ({self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s)"


def write_cache(cfg: ExperimentConfig, ckpt_path, out, split: str | None = None, dtype: str = "float16",
                shard: tuple[int, int] | None = None, batch_size: int | None = None, workers: int | None = None,
                device: str = "auto", ema: bool = True, progress: bool = True, on_entry=None) -> CacheReport:
    """Cache the BEV features of ``split`` (default ``data.val_split``) under ``out``; see the module doc.

    ``shard``: ``(i, n)``; None reads ``RANK`` / ``WORLD_SIZE`` (torchrun), else ``(0, 1)``.
    ``batch_size``: default ``data.eval_batch_size``; it decides which samples share a batch, so keep it
    the same when resuming or adding shards. ``on_entry(record)`` is called after each entry is in place.

    Raises ``CacheError`` / ``CheckpointError`` / ``ConfigError`` / ``DataError`` on bad input, before
    anything is written.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise CacheError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    split = split or cfg.data.val_split
    shard, shards = shard if shard is not None else shard_from_env()
    if not 0 <= shard < shards:
        raise CacheError(f"shard {shard}/{shards}: expected 0 <= shard < shards (RANK and WORLD_SIZE?)")
    out = Path(out)
    bs = batch_size or cfg.data.eval_batch_size
    if bs < 1:
        raise CacheError(f"batch size must be at least 1, got {bs}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    saved, model = load_model(ckpt_path, ema=ema)
    check_same_model(cfg, saved, ckpt_path)
    dm = BEVDataModule(cfg, eval_split=split)
    ds = dm.dataset(split, train=False)
    tokens = [s["token"] for s in ds.base.samples]
    index = dm.index
    dataset = {"root": str(Path(index.root).resolve()), "version": index.version, "identity": index.identity,
               "split": split, "samples": len(tokens), "tokens_sha256": tokens_sha256(tokens)}
    header = make_header(cfg, ckpt_path, file_sha256(ckpt_path), model.loaded_weights == "ema", dtype, dataset)
    found = existing_identity(out) if out.is_dir() else None
    if found is not None:
        diff = identity_differences(found[1], header)
        if diff:
            raise CacheError(f"{out} holds another cache ({found[0].name}); differs at {'; '.join(diff)}. "
                             f"Write to a new folder")
    entries_dir = out / ENTRIES
    entries_dir.mkdir(parents=True, exist_ok=True)

    batches = shard_batches(len(tokens), bs, shard, shards)
    mine = [i for b in batches for i in b]
    rep = CacheReport(out=out, shard=(shard, shards), samples=len(mine))
    cache_id = header["cache_id"]
    _remove_stale_temporaries(entries_dir, {entry_name(tokens[i]) for i in mine})

    # Entries already written (by an earlier, interrupted run) and intact are kept.
    records: dict[int, dict] = {}
    shape = None
    invalid = set()
    check = [i for i in mine if (entries_dir / entry_name(tokens[i])).exists()]
    for i in _bar(check, progress, f"verify shard {shard}/{shards}", shard):
        path = entries_dir / entry_name(tokens[i])
        try:
            info = verify_entry(path, tokens[i], cache_id, dtype=dtype, shape=shape)
        except EntryError:
            invalid.add(i)
            continue
        shape = shape or info.shape
        records[i] = _record(i, tokens[i], info)
    rep.skipped = len(records)

    todo = [b for b in batches if any(i not in records for i in b)]
    dev = pick_device(device)
    model.to(dev)
    nworkers = cfg.data.workers if workers is None else workers
    failed: dict[int, dict] = {}
    bar = _bar(None, progress, f"cache shard {shard}/{shards}", shard, total=len(mine), initial=rep.skipped)
    if todo:
        loader = DataLoader(_Guarded(ds, tokens), batch_sampler=todo, num_workers=nworkers, collate_fn=_collate,
                            pin_memory=dev.type == "cuda")
        for batch, bad in loader:
            bad = [it for it in bad if it["index"] not in records]  # a verified entry stays, whatever its reload did
            for it in bad:
                failed[it["index"]] = {"index": it["index"], "token": it["token"], "reason": it["error"]}
            done = len(bad)
            if batch is not None:
                feats = bev_features(model, to_device(batch, dev)).to(DTYPES[dtype][1]).cpu()  # (B, C, Y, X)
                for j, i in enumerate(batch["index"]):
                    if i in records:  # computed only to keep the batch as it always is
                        continue
                    x = feats[j]
                    if not torch.isfinite(x).all():
                        failed[i] = {"index": i, "token": tokens[i],
                                     "reason": f"features not finite in {dtype} (overflow?); "
                                               f"try --dtype bfloat16 or float32"}
                    else:
                        info = write_entry(entries_dir / entry_name(tokens[i]), tokens[i], cache_id, x)
                        shape = shape or info.shape
                        records[i] = _record(i, tokens[i], info)
                        rep.written += 1
                        rep.rewritten += i in invalid
                        rep.bytes_written += info.size
                        if on_entry is not None:
                            on_entry(records[i])
                    done += 1
            bar.update(done)
    bar.close()
    rep.failed = [failed[i] for i in sorted(failed)]

    doc = dict(header)
    doc["shape"] = list(shape) if shape is not None else None
    doc["shard"] = {"shard": [shard, shards], "batch_size": bs, "samples": len(mine),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    doc["entries"] = [records[i] for i in sorted(records)]
    doc["failed"] = rep.failed
    write_json_atomic(shard_file(out, shard, shards), doc)
    try:
        rep.manifest = merge(out)
    except CacheError:
        rep.manifest = None  # other shards are still running (or were never started)
    rep.seconds = time.perf_counter() - t0
    return rep


def _record(i: int, token: str, info) -> dict:
    return {"index": i, "token": token, "file": f"{ENTRIES}/{entry_name(token)}", "bytes": info.size,
            "sha256": info.sha256}


def _remove_stale_temporaries(entries_dir: Path, names: set[str]) -> None:
    """Temporary files a killed run of this shard left behind (other shards' are left alone)."""
    for p in entries_dir.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name and p.name[1:].split(TMP_MARK)[0] in names:
            p.unlink(missing_ok=True)


def _bar(it, progress: bool, desc: str, position: int, total: int | None = None, initial: int = 0):
    """A tqdm bar (rate and ETA) when ``progress``, else a silent stand-in."""
    if progress:
        from tqdm import tqdm

        return tqdm(it, desc=desc, total=total, initial=initial, unit="sample", position=position,
                    dynamic_ncols=True, smoothing=0.1)
    if it is not None:
        return it
    return _Silent()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

