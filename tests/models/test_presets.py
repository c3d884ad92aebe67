"""Every small preset in configs/: documented shapes, gradients to every parameter, overfitting."""

from pathlib import Path

import pytest
import torch
from tiny_batch import H, W, make_batch

from bevkit.models import build_model, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SYNTH = sorted(p.name for p in CONFIGS.glob("*-synth.yaml"))


def test_there_are_small_presets():
    assert len(SYNTH) >= 8, SYNTH


def expected_shapes(cfg, b: int, n: int) -> dict:
    """The shapes docs/models.md documents, computed from the config."""
    ny, nx = cfg.grid.shape
    out = {}
    if cfg.view_transform is not None and cfg.view_transform.type in ("lss", "lss_camera_aware", "lss_depth"):
        d = int(round((cfg.view_transform.dbound[1] - cfg.view_transform.dbound[0]) / cfg.view_transform.dbound[2]))
        out["depth"] = (b, n, d, H // 16, W // 16)
    c = cfg.fuser.channels if cfg.fuser else (cfg.view_transform or cfg.lidar).channels
    out["bev"] = (b, c, ny, nx)
    if cfg.map_prior is not None:
        out["map_prior_update"] = (b, c, ny, nx)
    if cfg.heads.map is not None:
        up = cfg.heads.map.upsample
        out["map"] = (b, len(cfg.heads.map.classes), ny * up, nx * up)
    if cfg.heads.occupancy is not None:
        out["occupancy"] = (b, cfg.heads.occupancy.num_classes, cfg.heads.occupancy.nz, ny, nx)
    return out


@pytest.mark.parametrize("preset", SYNTH)
def test_forward_shapes_and_every_parameter_gets_a_gradient(preset):
    cfg = load_config(CONFIGS / preset)
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=2)
    # timm's ResNets zero-initialise the last BN scale of each residual branch, which blocks the
    # gradient to that branch's convolutions at step 0; undo it so that an all-zero gradient below
    # can only mean a branch the loss does not reach.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.weight is not None and not m.weight.detach().any():
            torch.nn.init.ones_(m.weight)
    batch = make_batch(cfg, n_cams=2, batch=2)
    out = model(batch)
    for key, shape in expected_shapes(cfg, 2, 2).items():
        assert tuple(out[key].shape) == shape, (key, tuple(out[key].shape), shape)
    if cfg.heads.detection is not None:
        ny, nx = cfg.grid.shape
        det = out["detection"]
        assert len(det) == len(cfg.heads.detection.tasks)
        for task, classes in zip(det, cfg.heads.detection.tasks):
            assert tuple(task["heatmap"].shape) == (2, len(classes), ny, nx)
            for name, c in {"offset": 2, "height": 1, "size": 3, "rot": 2, "vel": 2}.items():
                assert tuple(task[name].shape) == (2, c, ny, nx)
            if any(c in ("car", "pedestrian", "bicycle", "bus", "truck") for c in classes):
                assert tuple(task["attr"].shape) == (2, len(cfg.heads.detection.attributes), ny, nx)
    if cfg.heads.detr is not None:
        d = cfg.heads.detr
        det = out["detection"]
        assert tuple(det["cls"].shape) == (d.layers, 2, d.num_queries, len(d.classes))
        assert tuple(det["code"].shape) == (d.layers, 2, d.num_queries, 10)
        assert tuple(det["attr"].shape) == (d.layers, 2, d.num_queries, len(d.attributes))
    losses = model.loss(out, batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient: {missing[:10]}"
    assert not bad, f"non-finite gradient: {bad[:10]}"
    # Every module with parameters is reached by the loss: a module whose gradients are all exactly zero
    # is an unused branch. (Checked per module, not per tensor: an L1 loss can legitimately give a
    # bias an exactly-zero gradient when the signs of two residuals cancel.)
    dead = [name for name, mod in model.named_modules()
            if list(mod.parameters(recurse=False))
            and all(p.grad.abs().sum() == 0 for p in mod.parameters(recurse=False))]
    assert not dead, f"all-zero gradient: {dead[:10]}"


@pytest.mark.parametrize("preset", SYNTH)
def test_a_few_steps_on_two_samples_drive_the_loss_down(preset):
    # Adam on a fixed batch of two samples: within 30 steps the loss must fall below a third of its
    # first value on two consecutive steps (the loop stops there, to keep the suite fast).
    cfg = load_config(CONFIGS / preset)
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=1)
    batch = make_batch(cfg, n_cams=1, batch=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        total = model.loss(model(batch), batch)["loss"]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
        if len(losses) > 2 and max(losses[-2:]) < losses[0] / 3:
            break
    assert max(losses[-2:]) < losses[0] / 3, [round(v, 3) for v in losses]


FULL = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.endswith("-synth.yaml"))


@pytest.mark.parametrize("preset", FULL)
def test_full_size_presets_build(preset):
    # Built on the meta device: the wiring (channels, variants, config validation) without the
    # seconds of weight initialisation; forward passes at full size belong to benchmarks.
    cfg = load_config(CONFIGS / preset)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.cfg.name == Path(preset).stem
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


# bev_pool, deform_attn, sparse_conv3d; BEVDepth's depth loss and deformable depth net
@pytest.mark.parametrize("preset", ["bevdet-synth.yaml", "bevformer-synth.yaml", "bevfusion-synth.yaml",
                                    "bevdepth-synth.yaml"])
def test_a_training_step_under_bf16_autocast(preset):
    # The sparse ops have no bf16 CSR kernel on CPU; the models run them in float32 inside autocast. The
    # batch carries a BEV augmentation, composed with the camera poses in float32.
    cfg = load_config(CONFIGS / preset)
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=2)
    batch = make_batch(cfg, n_cams=2, batch=2)
    batch["bev_aug"] = torch.diag(torch.tensor([1.02, -1.02, 1.02, 1.0])).expand(2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        losses = model.loss(out, batch)
    det = out["detection"]
    assert (det["cls"] if isinstance(det, dict) else det[0]["heatmap"]).dtype == torch.bfloat16
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
