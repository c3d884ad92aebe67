"""The cache manifest: what produced the features, the per-entry checksums, shard merging and ``verify``.

A cache folder::

    DIR/manifest.json                  the whole split, written once every shard is done (merged)
    DIR/manifest.shard-I-of-N.json     one per shard run: its entries and failures
    DIR/entries/<token>.safetensors    one per sample (``bevkit.cache.entry``)

Every manifest carries the same *identity* (config hash, checkpoint hash, weights, dtype, dataset
version / identity / split / token list): shards of different identities never merge, a job never
resumes into a folder of another identity, and the reader refuses a cache whose identity does not
match the config it is asked to serve.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import bevkit
from bevkit.atomic import write_text_atomic
from bevkit.cache.entry import EntryError, verify_entry
from bevkit.config import ExperimentConfig

SCHEMA = 1
FORMAT = "bevkit-bev-feature-cache"
MANIFEST = "manifest.json"
ENTRIES = "entries"
_SHARD_FILE = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.json")

# Fields that must agree between shards, between a folder and a job resuming into it.
IDENTITY = ("format", "schema", "cache_id", "config_hash", "checkpoint.sha256", "checkpoint.weights", "dtype",
            "dataset.version", "dataset.identity", "dataset.split", "dataset.samples", "dataset.tokens_sha256")


class CacheError(ValueError):
    """A cache that cannot be written, merged or served as asked; the message names the folder and field."""


def feature_config(cfg: ExperimentConfig) -> dict:
    """What determines a sample's feature map besides the weights and the data: the model section and the
    input settings the model reads (cameras and image size for camera models, LiDAR sweeps for LiDAR
    models). Paths, batch sizes, workers, augmentation (off when caching) and training settings are left
    out, so a cache written on one machine serves the same config on another."""
    d = cfg.to_dict()
    m = cfg.model
    camera = m.view_transform is not None
    if camera and d["model"]["view_transform"].get("num_cameras") is None:  # added later; unset, it changes nothing
        d["model"]["view_transform"].pop("num_cameras", None)
    inputs = {"cameras": list(d["data"]["cameras"]) if camera else [],
              "image_size": list(d["data"]["image_size"]) if camera else None,
              "sweeps": d["data"]["sweeps"] if m.lidar is not None else 0}
    if inputs["sweeps"]:  # which sweep points are kept (entered only with sweeps, where it changes them)
        inputs["sweep_min_distance"] = d["data"]["sweep_min_distance"]
    return {"model": d["model"], "inputs": inputs}


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 of the canonical JSON of ``feature_config(cfg)``."""
    return _sha256_json(feature_config(cfg))


def tokens_sha256(tokens: list[str]) -> str:
    """sha256 of a split's sample tokens in order (one per line)."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def grid_record(cfg: ExperimentConfig) -> dict:
    """The BEV grid the features lie on: ego frame, (min, max, step) per axis in metres, (Y, X) cells."""
    g = cfg.model.grid
    return {"frame": "ego", "xbound": list(g.xbound), "ybound": list(g.ybound), "zbound": list(g.zbound),
            "shape": list(g.shape)}


def make_header(cfg: ExperimentConfig, ckpt_path, ckpt_sha256: str, ema: bool, dtype: str, dataset: dict) -> dict:
    """The manifest fields every shard of one cache shares (``entries``/``failed``/``shape`` come later).

    ``dataset``: {root, version, identity, split, samples, tokens_sha256}.
    """
    chash = config_hash(cfg)
    weights = "ema" if ema else "raw"
    cache_id = _sha256_json([chash, ckpt_sha256, weights, dtype, dataset["version"], dataset["identity"],
                             dataset["split"], dataset["tokens_sha256"]])[:32]
    return {"format": FORMAT, "schema": SCHEMA, "bevkit_version": bevkit.__version__, "cache_id": cache_id,
            "config_hash": chash, "experiment_digest": cfg.digest(), "config": feature_config(cfg),
            "checkpoint": {"path": str(ckpt_path), "sha256": ckpt_sha256, "weights": weights},
            "grid": grid_record(cfg), "tensor": "features", "dtype": dtype, "shape": None,
            "dataset": dict(dataset),
            # A map-prior model's features are cached with an empty prior: the memory is state that
            # evaluation fills in time order, which a sharded, resumable cache does not reproduce.
            **({"map_prior": "empty"} if cfg.model.map_prior is not None else {})}


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def identity_differences(a: dict, b: dict) -> list[str]:
    """``IDENTITY`` fields where two manifests differ, as ``field (a vs b)``."""
    return [f"{k} ({_get(a, k)} vs {_get(b, k)})" for k in IDENTITY if _get(a, k) != _get(b, k)]


def value_differences(a, b, prefix: str) -> list[str]:
    """Dotted keys where two nested dicts differ, each with both values: ``key: a vs b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += value_differences(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: {json.dumps(a)} vs {json.dumps(b)}"]


def shard_file(out: Path, shard: int, shards: int) -> Path:
    return Path(out) / f"manifest.shard-{shard}-of-{shards}.json"


def write_json_atomic(path: Path, doc: dict) -> None:
    """JSON (indent 1, final newline) written atomically: the old file or the new one."""
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheError(f"{path}: not a bevkit BEV feature cache manifest")
    if doc.get("schema") != SCHEMA:
        raise CacheError(f"{path}: manifest schema {doc.get('schema')}, this bevkit reads schema {SCHEMA}")
    _check_fields(doc, path)
    return doc


_RECORD_FIELDS = {"entries": ("index", "token", "file", "bytes", "sha256"), "failed": ("index", "token", "reason")}


def _check_fields(doc: dict, path: Path) -> None:
    """A damaged manifest (a field or a record's field missing) is a ``CacheError`` naming what is missing."""
    for key in ("cache_id", "config_hash", "checkpoint", "dtype", "dataset", "entries", "failed"):
        if key not in doc:
            raise CacheError(f"{path}: damaged manifest, no {key!r}")
    if not isinstance(doc["dataset"], dict) or not isinstance(doc["checkpoint"], dict):
        raise CacheError(f"{path}: damaged manifest, 'dataset' and 'checkpoint' must be objects")
    for key, fields in _RECORD_FIELDS.items():
        if not isinstance(doc[key], list):
            raise CacheError(f"{path}: damaged manifest, {key!r} must be a list")
        for k, rec in enumerate(doc[key]):
            missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
            if missing:
                raise CacheError(f"{path}: damaged manifest, {key}[{k}] has no {', '.join(missing)}")


def shard_manifests(out: Path) -> list[tuple[Path, dict]]:
    """Every ``manifest.shard-I-of-N.json`` in a folder, read and checked to share one identity."""
    found = []
    for p in sorted(Path(out).glob("manifest.shard-*-of-*.json")):
        if _SHARD_FILE.fullmatch(p.name):
            found.append((p, read_json(p)))
    for p, m in found[1:]:
        diff = identity_differences(found[0][1], m)
        if diff:
            raise CacheError(f"{p} and {found[0][0]} describe different caches: {'; '.join(diff)}")
    return found


def existing_identity(out: Path) -> tuple[Path, dict] | None:
    """A manifest already in the folder (the merged one, else a shard's), if any."""
    merged = Path(out) / MANIFEST
    if merged.is_file():
        return merged, read_json(merged)
    shards = shard_manifests(out)
    return shards[0] if shards else None


@dataclass
class Union:
    """What a folder's shard manifests record together: per split index the latest record."""

    header: dict
    records: dict[int, dict] = field(default_factory=dict)  # index -> entry or failure record
    shards: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def union_of_shards(out: Path) -> Union:
    """All shard manifests of a folder combined; a sample recorded twice keeps its latest record (a later
    run, with any number of shards, supersedes an earlier one)."""
    found = shard_manifests(out)
    if not found:
        raise CacheError(f"{out}: no shard manifests (manifest.shard-I-of-N.json); nothing was cached here")
    found.sort(key=lambda pm: (pm[1]["shard"]["finished"], pm[0].name))
    header = {k: v for k, v in found[-1][1].items() if k not in ("shard", "entries", "failed", "shape")}
    u = Union(header=header, files=[p for p, _ in found])
    shapes = {}
    for p, m in found:
        u.shards.append(m["shard"])
        if m.get("shape") is not None:
            shapes[tuple(m["shape"])] = p
        for rec in m["entries"]:
            u.records[rec["index"]] = rec
        for rec in m["failed"]:
            u.records[rec["index"]] = rec
    if len(shapes) > 1:
        raise CacheError(f"{out}: shards hold features of different shapes: "
                         + ", ".join(f"{list(s)} ({p.name})" for s, p in shapes.items()))
    u.header["shape"] = list(next(iter(shapes))) if shapes else None
    return u


def merge(out: Path) -> Path:
    """Merge a folder's shard manifests into ``manifest.json`` (atomically). Raises ``CacheError`` listing
    what is missing when the shards do not yet cover the split (samples neither written nor failed, or
    entry files that are gone). Idempotent: merging again gives the same file."""
    out = Path(out)
    u = union_of_shards(out)
    n = u.header["dataset"]["samples"]
    missing = [k for k in range(n) if k not in u.records]
    if missing:
        pending = sorted({f"{s['shard'][0]}/{s['shard'][1]}" for s in u.shards})
        raise CacheError(f"{out}: {len(missing)} of {n} samples not cached yet (first missing: split index "
                         f"{missing[0]}); shard manifests present: {', '.join(pending)}. Run the missing "
                         f"shards (bevkit cache CONFIG CKPT --shard I/N) and merge again")
    records = [u.records[k] for k in range(n)]
    if tokens_sha256([r["token"] for r in records]) != u.header["dataset"]["tokens_sha256"]:
        raise CacheError(f"{out}: the shards' sample tokens do not match the split they were written for")
    entries = [r for r in records if "sha256" in r]
    gone = [r for r in entries if not (out / r["file"]).is_file() or (out / r["file"]).stat().st_size != r["bytes"]]
    if gone:
        raise CacheError(f"{out}: {len(gone)} entry file(s) missing or resized since their shard finished, e.g. "
                         f"{gone[0]['file']}; run the job again to rewrite them")
    doc = dict(u.header)
    doc["shards"] = sorted(u.shards, key=lambda s: (s["shard"][1], s["shard"][0], s["finished"]))
    doc["entries"] = entries
    doc["failed"] = [r for r in records if "sha256" not in r]
    doc["bytes"] = sum(r["bytes"] for r in entries)
    path = out / MANIFEST
    write_json_atomic(path, doc)
    return path


def load_manifest(out: Path) -> dict:
    """The merged ``manifest.json`` of a cache folder."""
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        hint = (" (shard manifests are present: `bevkit cache merge DIR` once every shard is done)"
                if list(out.glob("manifest.shard-*-of-*.json")) else "")
        raise CacheError(f"{out}: no {MANIFEST}; not a finished bevkit feature cache{hint}")
    return read_json(path)


@dataclass
class VerifyReport:
    """``verify`` outcome: entries checked, the bad ones (token, file, reason), failed samples recorded."""

    manifest: str
    checked: int = 0
    bad: list[dict] = field(default_factory=list)
    failed_samples: int = 0
    complete: bool = True

    @property
    def ok(self) -> bool:
        return not self.bad


def verify(out: Path, progress: bool = False) -> VerifyReport:
    """Check every entry of a cache against its manifest: present, header as written, size, sha256 of the
    tensor bytes. Uses ``manifest.json``, or the shard manifests of an unfinished cache."""
    out = Path(out)
    if (out / MANIFEST).is_file() or not list(out.glob("manifest.shard-*-of-*.json")):
        doc = load_manifest(out)
        entries, failed, rep = doc["entries"], doc["failed"], VerifyReport(str(out / MANIFEST))
    else:
        u = union_of_shards(out)
        doc = u.header
        entries = [r for _, r in sorted(u.records.items()) if "sha256" in r]
        failed = [r for r in u.records.values() if "sha256" not in r]
        rep = VerifyReport(", ".join(p.name for p in u.files), complete=False)
    rep.failed_samples = len(failed)
    it = entries
    if progress:
        from tqdm import tqdm

        it = tqdm(entries, desc="verify", unit="entry", dynamic_ncols=True)
    for rec in it:
        rep.checked += 1
        try:
            verify_entry(out / rec["file"], rec["token"], doc["cache_id"], rec["sha256"], doc["dtype"], doc["shape"])
        except EntryError as e:
            rep.bad.append({"token": rec["token"], "file": rec["file"], "reason": str(e).split(": ", 1)[-1]})
    return rep
