"""`CachedFeatures`: cached features with their annotations; a cache that does not match is refused."""

import pytest
import torch
from cache_helpers import SPLIT

from bevkit.cache import CachedFeatures, CacheError, collate_cached, load_manifest
from bevkit.cache.entry import entry_name, open_entry
from bevkit.config import load_experiment
from bevkit.data.dataset import DataConfig, NuScenesDataset


def test_serves_features_with_the_samples_annotations(tiny_model, reference_cache, tiny_root):
    cfg_path, ckpt = tiny_model
    out, _ = reference_cache
    cfg = load_experiment(cfg_path)
    ds = CachedFeatures(out, cfg, dtype="float16", checkpoint=ckpt, verify=True)
    plain = NuScenesDataset(tiny_root, SPLIT, DataConfig(cameras=(), load_points=False))
    assert len(ds) == len(plain) == 6 and ds.failed == []
    for k in (0, 5):
        item, ref = ds[k], plain[k]
        assert item["token"] == ref["token"] and item["index"] == k
        assert item["features"].shape == (16, 64, 64) and item["features"].dtype == torch.float16
        assert torch.equal(item["features"], open_entry(out / "entries" / entry_name(ref["token"])))
        torch.testing.assert_close(item["boxes"], ref["boxes"], equal_nan=True)
        assert item["instances"] == ref["instances"] and torch.equal(item["global_from_ego"], ref["global_from_ego"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_cached)
    batch = next(iter(loader))
    assert batch["features"].shape == (4, 16, 64, 64) and batch["global_from_ego"].shape == (4, 4, 4)
    assert len(batch["boxes"]) == 4
    assert len(CachedFeatures(out, cfg, annotations=False)[3]) == 3  # token, index, features


@pytest.mark.parametrize("overrides, needle", [
    (["model.grid.ybound=[-12.8, 12.8, 0.8]"],
     ("BEV grid differs from the config's (cache vs config): grid.shape: [64, 64] vs [32, 64]; "
      "grid.ybound: [-25.6, 25.6, 0.8] vs [-12.8, 12.8, 0.8]")),
    (["model.bev_encoder.out_channels=32"], "differs at (cache vs config) model.bev_encoder.out_channels: 16 vs 32"),
    (["data.sweeps=3"], "differs at (cache vs config) inputs.sweep_min_distance: null vs 1.0; inputs.sweeps: 0 vs 3"),
])
def test_refuses_a_cache_written_for_another_config(tiny_model, reference_cache, overrides, needle):
    cfg_path, _ = tiny_model
    out, _ = reference_cache
    with pytest.raises(CacheError) as e:
        CachedFeatures(out, load_experiment(cfg_path, overrides))
    assert str(out) in str(e.value) and needle in str(e.value), str(e.value)


def test_refuses_another_dtype_checkpoint_or_dataset(tiny_model, reference_cache, tmp_path):
    cfg_path, ckpt = tiny_model
    out, _ = reference_cache
    cfg = load_experiment(cfg_path)
    with pytest.raises(CacheError, match="holds float16 features, bfloat16 was asked for"):
        CachedFeatures(out, cfg, dtype="bfloat16")
    other = tmp_path / "other.ckpt"
    other.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(CacheError, match="written with another checkpoint"):
        CachedFeatures(out, cfg, checkpoint=other)
    # Settings that do not change the features (paths, batch sizes, workers) do not matter.
    CachedFeatures(out, load_experiment(cfg_path, ["data.eval_batch_size=1", "data.workers=3", "out=elsewhere"]))
    # A merged manifest is required.
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no manifest.json"):
        CachedFeatures(tmp_path / "empty", cfg)
    assert load_manifest(out)["config_hash"] != ""


def test_a_damaged_entry_is_an_error_not_wrong_features(tiny_model, reference_cache, tmp_path):
    import shutil

    cfg_path, _ = tiny_model
    ref, _ = reference_cache
    out = tmp_path / "cache"
    shutil.copytree(ref, out)
    path = out / "entries" / load_manifest(out)["entries"][2]["file"].split("/")[-1]
    path.write_bytes(path.read_bytes()[:-10])
    ds = CachedFeatures(out, load_experiment(cfg_path), annotations=False)
    ds[1]
    with pytest.raises(CacheError, match="bytes"):
        ds[2]


def test_features_read_against_a_dataset_are_checked_against_it(tiny_model, reference_cache, tiny_root, tmp_path):
    import json
    import shutil

    from bevkit.data.nuscenes import NuScenesIndex

    cfg_path, _ = tiny_model
    out, _ = reference_cache
    cfg = load_experiment(cfg_path)
    index = NuScenesIndex.load(tiny_root)
    assert len(CachedFeatures(out, cfg, annotations=False, index=index)) == 6
    # The same samples and tokens, but one table rewritten (one more byte): another dataset identity.
    edited = tmp_path / "edited"
    shutil.copytree(tiny_root / "v1.0-mini", edited / "v1.0-mini")
    log = edited / "v1.0-mini" / "log.json"
    log.write_text(log.read_text() + "\n")
    other = NuScenesIndex.load(edited)
    assert other.identity != index.identity and other.split(SPLIT)[0]["token"] == index.split(SPLIT)[0]["token"]
    for kwargs in ({"annotations": False, "index": other}, {"annotations": True, "index": other}):
        with pytest.raises(CacheError) as e:
            CachedFeatures(out, cfg, **kwargs)
        msg = str(e.value)
        assert msg.startswith(f"{out}: written from another dataset") and "\n" not in msg
        assert index.identity in msg and other.identity in msg and str(edited) in msg
    # Identical tables (same identity), but a split file that puts another scene in the split.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_root / "v1.0-mini", moved / "v1.0-mini")
    splits = json.loads((moved / "v1.0-mini" / "splits.json").read_text())
    splits[SPLIT] = [n for k, v in splits.items() if k != SPLIT for n in v][:1]
    (moved / "v1.0-mini" / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(CacheError, match=f"split '{SPLIT}' of {moved} is not the one cached"):
        CachedFeatures(out, cfg, annotations=False, index=NuScenesIndex.load(moved))
    # A split that grew (another scene added): its new samples would be silently left out.
    splits[SPLIT] = json.loads((tiny_root / "v1.0-mini" / "splits.json").read_text())[SPLIT] + splits[SPLIT]
    (moved / "v1.0-mini" / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(CacheError, match="12 samples now, 6 when the cache was written"):
        CachedFeatures(out, cfg, annotations=False, index=NuScenesIndex.load(moved))
