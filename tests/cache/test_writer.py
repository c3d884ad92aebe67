"""`bevkit cache`: the stored features are the model's, a killed job resumes to the same cache, corrupted
entries are caught and rewritten, shards from separate processes merge, failures are listed."""

import json
import shutil
import sys

import torch
from cache_helpers import (
    SPLIT,
    entry_bytes,
    manifest_without_times,
    tiny_config,
    write_yaml,
)

from bevkit.cache import CachedFeatures, load_manifest, merge, verify, write_cache
from bevkit.cache.entry import entry_name, open_entry
from bevkit.cli import main
from bevkit.config import load_experiment
from bevkit.engine.checkpoint import load_model
from bevkit.engine.data import BEVDataModule, collate_history


def test_entries_hold_the_models_features_and_the_manifest_says_what_made_them(tiny_model, reference_cache):
    cfg_path, ckpt = tiny_model
    out, report = reference_cache
    cfg = load_experiment(cfg_path)
    m = load_manifest(out)
    assert report.written == report.samples == 6 and report.skipped == 0 and not report.failed
    assert m["dtype"] == "float16" and m["shape"] == [16, 64, 64] and m["grid"]["shape"] == [64, 64]
    assert m["grid"]["xbound"] == [-25.6, 25.6, 0.8] and m["grid"]["frame"] == "ego"
    assert m["dataset"]["split"] == SPLIT and m["dataset"]["samples"] == 6 and m["failed"] == []
    assert m["checkpoint"]["weights"] == "ema" and len(m["checkpoint"]["sha256"]) == 64
    assert [e["index"] for e in m["entries"]] == list(range(6))

    # Entry i equals BEVModel.forward(batch)["features"] (EMA weights) cast to float16, bit for bit.
    _, model = load_model(ckpt)
    ds = BEVDataModule(cfg, eval_split=SPLIT).dataset(SPLIT, train=False)
    batch = collate_history([ds[2], ds[3]])  # the batch the cache computed them in
    with torch.no_grad():
        feats = model(batch)["features"].half()  # (2, 16, 64, 64)
    for j, token in enumerate(batch["token"]):
        assert torch.equal(open_entry(out / "entries" / entry_name(token)), feats[j])


def test_a_killed_job_resumes_to_the_uninterrupted_cache(tiny_model, reference_cache, tmp_path, cache_env):
    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    out = tmp_path / "cache"
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from bevkit.cache import write_cache\n"
        "from bevkit.config import load_experiment\n"
        "count = 0\n"
        "def on_entry(record):\n"
        "    global count\n"
        "    count += 1\n"
        "    if count == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # mid-batch: entry 2 of batch [2, 3] is written, 3 is not\n"
        "write_cache(load_experiment(sys.argv[1]), sys.argv[2], sys.argv[3], split=sys.argv[4], shard=(0, 1),\n"
        "            progress=False, on_entry=on_entry)\n")
    import subprocess

    proc = subprocess.run([sys.executable, str(script), cfg_path, str(ckpt), str(out), SPLIT], env=cache_env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert len(list((out / "entries").glob("*.safetensors"))) == 3 and not (out / "manifest.json").exists()
    # A temporary file as a kill during a write leaves it; the resumed job removes it.
    stale = out / "entries" / f".{max((ref / 'entries').iterdir()).name}.tmp-12345"
    stale.write_bytes(b"half")

    report = write_cache(load_experiment(cfg_path), ckpt, out, split=SPLIT, progress=False)
    assert (report.skipped, report.written, report.failed) == (3, 3, [])
    assert not stale.exists()
    assert entry_bytes(out) == entry_bytes(ref)
    assert manifest_without_times(out) == manifest_without_times(ref)
    assert verify(out).ok


def test_verify_catches_corrupted_entries_and_a_rerun_rewrites_them(tiny_model, reference_cache, tmp_path,
                                                                     capsys):
    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    out = tmp_path / "cache"
    shutil.copytree(ref, out)
    names = sorted(p.name for p in (out / "entries").iterdir())
    for name, pos in ((names[1], -100), (names[4], 20)):  # a byte of the features, a byte of the header
        path = out / "entries" / name
        data = bytearray(path.read_bytes())
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))

    assert main(["cache", "verify", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    bad = [line for line in captured.err.splitlines() if line.startswith("bad:")]
    assert len(bad) == 2
    assert any(names[1] in line and "checksum mismatch" in line for line in bad)
    assert any(names[4] in line for line in bad)
    assert "6 entries checked, 2 bad" in captured.out

    assert main(["cache", cfg_path, str(ckpt), "--split", SPLIT, "--out", str(out)]) == 0
    assert "written 2, skipped 4" in capsys.readouterr().out
    assert main(["cache", "verify", str(out), "--no-progress"]) == 0
    assert entry_bytes(out) == entry_bytes(ref)
    assert manifest_without_times(out) == manifest_without_times(ref)


def test_two_shards_in_separate_processes_merge_into_the_single_process_cache(tiny_model, reference_cache,
                                                                             tmp_path, cache_env, capsys,
                                                                             monkeypatch):
    import subprocess

    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    out = tmp_path / "cache"
    args = ["cache", cfg_path, str(ckpt), "--split", SPLIT, "--out", str(out)]
    # Shard 0 in another process, by option; shard 1 in this one, by the environment torchrun sets.
    other = subprocess.Popen([sys.executable, "-m", "bevkit.cli", *args, "--shard", "0/2"], env=cache_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0
    stdout, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    here = capsys.readouterr().out
    assert "shard 0/2: 4 samples" in stdout and "shard 1/2: 2 samples" in here
    assert "every shard done" in stdout + here  # whichever finished last merged

    assert entry_bytes(out) == entry_bytes(ref)
    merged = manifest_without_times(out)
    single = manifest_without_times(ref)
    assert [s["shard"] for s in merged.pop("shards")] == [[0, 2], [1, 2]]
    single.pop("shards")
    assert merged == single
    (out / "manifest.json").unlink()
    assert main(["cache", "merge", str(out)]) == 0
    assert {k: v for k, v in manifest_without_times(out).items() if k != "shards"} == single
    assert verify(out).ok


def test_a_sample_that_fails_to_load_is_listed_with_its_reason(tiny_model, tiny_root, tmp_path, capsys):
    cfg_path, ckpt = tiny_model
    root, missing_token, missing_file = _root_without_one_lidar_file(tiny_root, tmp_path)
    doc = json.loads(json.dumps(load_experiment(cfg_path).to_dict()))
    doc["data"]["root"] = str(root)
    bad_cfg = write_yaml(tmp_path / "broken.yaml", doc)
    out = tmp_path / "cache"

    assert main(["cache", bad_cfg, str(ckpt), "--split", SPLIT, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "written 5, skipped 0 (already cached), failed 1" in captured.out
    assert f"failed: sample {missing_token}" in captured.err and missing_file in captured.err
    m = load_manifest(out)
    assert len(m["entries"]) == 5
    [failed] = m["failed"]
    assert failed["token"] == missing_token and missing_file in failed["reason"]
    assert "DataError" in failed["reason"] and "No such file or directory" in failed["reason"]

    ds = CachedFeatures(out, load_experiment(bad_cfg))
    assert len(ds) == 5 and ds.failed == m["failed"] and missing_token not in {ds[k]["token"] for k in range(5)}
    # Re-running retries the failed sample (it fails again, the rest is skipped).
    report = write_cache(load_experiment(bad_cfg), ckpt, out, split=SPLIT, progress=False)
    assert (report.skipped, report.written, len(report.failed)) == (5, 0, 1)


def test_a_folder_of_another_cache_is_refused(tiny_model, reference_cache, capsys):
    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    before = entry_bytes(ref)
    assert main(["cache", cfg_path, str(ckpt), "--split", SPLIT, "--out", str(ref), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another cache" in err and "dtype (float16 vs bfloat16)" in err
    assert main(["cache", cfg_path, str(ckpt), "--split", "mini_val", "--out", str(ref)]) == 2
    assert "dataset.split (mini_train vs mini_val)" in capsys.readouterr().err
    assert entry_bytes(ref) == before
    assert merge(ref) == ref / "manifest.json"  # merging a finished cache again changes nothing


def _root_without_one_lidar_file(tiny_root, tmp_path):
    """The tiny world with the keyframe LiDAR file of the second training sample missing (tables copied,
    other files linked). Returns (root, its token, the missing file's name)."""
    from bevkit.data.nuscenes import NuScenesIndex

    index = NuScenesIndex.load(tiny_root)
    sample = index.split(SPLIT)[1]
    missing = sample["lidar"]["filename"]
    root = tmp_path / "broken"
    root.mkdir()
    for entry in tiny_root.iterdir():
        if entry.name == "samples":
            continue
        if entry.is_dir() and entry.name.startswith("v1.0"):
            shutil.copytree(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for folder in (tiny_root / "samples").iterdir():
        if folder.name != "LIDAR_TOP":
            (root / "samples" / folder.name).parent.mkdir(exist_ok=True)
            (root / "samples" / folder.name).symlink_to(folder, target_is_directory=True)
            continue
        (root / "samples" / "LIDAR_TOP").mkdir(parents=True)
        for f in folder.iterdir():
            if f.name != missing.split("/")[-1]:
                (root / "samples" / "LIDAR_TOP" / f.name).symlink_to(f)
    return root, sample["token"], missing.split("/")[-1]


def test_a_temporal_model_caches_what_the_training_module_computes(tiny_root, tmp_path, cache_env):
    """BEVDet4D-style history: the previous keyframe is encoded first, as ``BEVLitModule.run`` does."""
    from bevkit.engine.module import BEVLitModule

    doc = tiny_config(tiny_root, tmp_path / "run")
    doc["model"]["temporal"] = {"frames": 2}
    cfg = load_experiment(write_yaml(tmp_path / "temporal.yaml", doc))
    torch.manual_seed(0)
    module = BEVLitModule(cfg).eval()
    ckpt = tmp_path / "untrained.ckpt"  # a checkpoint as bevkit train writes it, without training
    torch.save({"bevkit": {"schema": 1, "version": "test", "config": cfg.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}, ckpt)
    out = tmp_path / "cache"
    report = write_cache(cfg, ckpt, out, split=SPLIT, progress=False)
    assert report.written == 6 and report.manifest == out / "manifest.json"

    ds = BEVDataModule(cfg, eval_split=SPLIT).dataset(SPLIT, train=False)
    batch = collate_history([ds[2], ds[3]])
    assert len(batch["history"]) == 1
    with torch.no_grad():
        feats = module.run(batch)["features"].half()
    for j, token in enumerate(batch["token"]):
        assert torch.equal(open_entry(out / "entries" / entry_name(token)), feats[j])


def test_features_that_overflow_float16_are_failed_with_a_hint(tiny_model, tmp_path, monkeypatch):
    import bevkit.cache.writer as writer

    cfg_path, ckpt = tiny_model
    real = writer.bev_features

    def loud(model, batch):  # the first sample's features beyond float16's range (65504)
        feats = real(model, batch).clone()
        feats[[j for j, i in enumerate(batch["index"]) if i == 0]] += 1e6
        return feats

    monkeypatch.setattr(writer, "bev_features", loud)
    half = write_cache(load_experiment(cfg_path), ckpt, tmp_path / "half", split=SPLIT, progress=False)
    [failed] = half.failed
    assert failed["index"] == 0 and "not finite in float16" in failed["reason"] and "bfloat16" in failed["reason"]
    assert half.written == 5
    full = write_cache(load_experiment(cfg_path), ckpt, tmp_path / "full", split=SPLIT, dtype="float32",
                       progress=False)
    assert not full.failed and full.written == 6


def test_a_verified_entry_stays_when_its_reload_fails_in_a_resumed_batch(tiny_model, reference_cache, tmp_path,
                                                                         monkeypatch):
    from bevkit.data.dataset import NuScenesDataset

    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    out = tmp_path / "cache"
    shutil.copytree(ref, out)
    first = sorted((out / "entries").iterdir())
    m = load_manifest(out)
    by_index = {r["index"]: out / r["file"] for r in m["entries"]}
    by_index[0].write_bytes(by_index[0].read_bytes()[:-4] + b"oops")  # entry 0 damaged: its batch [0, 1] reruns
    load = NuScenesDataset.load

    def flaky(self, i, *args, **kwargs):
        if i == 1:  # sample 1's entry is fine, but reloading it now fails
            raise OSError("transient read error")
        return load(self, i, *args, **kwargs)

    monkeypatch.setattr(NuScenesDataset, "load", flaky)
    report = write_cache(load_experiment(cfg_path), ckpt, out, split=SPLIT, progress=False)
    assert report.failed == [] and report.written == 1
    assert [r["index"] for r in load_manifest(out)["entries"]] == list(range(6)) and not load_manifest(out)["failed"]
    assert sorted((out / "entries").iterdir()) == first and verify(out).ok


def test_the_manifest_says_which_weights_were_cached(tiny_model, reference_cache, tmp_path):
    cfg_path, ckpt = tiny_model
    ref, _ = reference_cache
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "ema" in saved and load_manifest(ref)["checkpoint"]["weights"] == "ema"
    saved.pop("ema")  # a run without EMA: its raw weights are cached, and the manifest says so
    plain = tmp_path / "plain.ckpt"
    torch.save(saved, plain)
    out = tmp_path / "cache"
    write_cache(load_experiment(cfg_path), plain, out, split=SPLIT, progress=False)
    assert load_manifest(out)["checkpoint"]["weights"] == "raw"
