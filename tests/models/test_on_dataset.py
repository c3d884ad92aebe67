"""The synth presets on real samples of the synthetic world: the data contract end to end."""

from pathlib import Path

import pytest
import torch

from bevkit.config import load_experiment
from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.engine.data import data_config
from bevkit.models import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("preset", ["bevfusion-synth.yaml", "nmp-synth.yaml", "bevdet-occ-synth.yaml"])
def test_synth_preset_trains_and_decodes_on_dataset_samples(tiny_root, tmp_path, monkeypatch, preset):
    monkeypatch.setenv("BEVKIT_CACHE", str(tmp_path / "cache"))
    exp = load_experiment(CONFIGS / preset)
    cfg = exp.model
    ds = NuScenesDataset(tiny_root, "mini_train", data_config(exp, train=False))
    batch = collate([ds[0], ds[1]])
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=len(exp.data.cameras))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        total = model.loss(model(batch), batch)["loss"]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        preds = model.decode(model(batch))
    if cfg.heads.detection is not None:
        for det in preds["detection"]:
            assert det["boxes"].shape[1] == 9 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"])
    if cfg.heads.map is not None:
        assert preds["map"].shape == batch["map"].shape
    if cfg.heads.occupancy is not None:  # Occ3D's 200 x 200 x 16 labels, a coarser prediction
        f = batch["occupancy"].shape[1] // cfg.grid.shape[1]
        fz = batch["occupancy"].shape[3] // cfg.heads.occupancy.nz
        assert preds["occupancy"].shape == (2, *cfg.grid.shape[::-1], cfg.heads.occupancy.nz)
        with torch.no_grad():
            fine = model.heads["occupancy"].decode(model(batch)["occupancy"], (f, f, fz))
        assert fine.shape == batch["occupancy"].shape


def test_depth_labels_from_the_dataset_lidar_follow_the_ground(tiny_root, tmp_path, monkeypatch):
    # The sample's ego-frame points, its ego_from_cam, intrinsics and img_aug must agree: projected
    # LiDAR covers most feature cells, and on the ground the lowest image rows are the nearest.
    from bevkit.models.view_transforms import depth_targets

    monkeypatch.setenv("BEVKIT_CACHE", str(tmp_path / "cache"))
    ds = NuScenesDataset(tiny_root, "mini_train", DataConfig(image_size=(64, 176)))
    batch = collate([ds[0]])
    labels = depth_targets(batch["points"], batch["intrinsics"], batch["img_aug"], batch["ego_from_cam"],
                           (4, 11), 16, (1.0, 60.0, 1.0))  # (1, 6, 4, 11) bins of 1 m
    assert (labels >= 0).float().mean() > 0.8
    bottom, above = labels[:, :, 3], labels[:, :, 2]
    both = (bottom >= 0) & (above >= 0)
    assert (bottom[both] <= above[both]).float().mean() > 0.9
