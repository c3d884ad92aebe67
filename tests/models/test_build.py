"""Config validation, the variant dicts, local checkpoints and temporal state passed in and out."""

import pickle
from pathlib import Path

import pydantic
import pytest
import torch
from tiny_batch import make_batch

from bevkit.models import ModelConfig, build_model, load_config
from bevkit.models.backbones import TimmBackbone
from bevkit.models.build import VIEW_TRANSFORMS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_config_rejects_unknown_keys_and_is_frozen(tmp_path):
    with pytest.raises(pydantic.ValidationError):
        ModelConfig(view_transfrom=None)
    with pytest.raises(pydantic.ValidationError):
        ModelConfig(heads={"detection": {"chanels": 3}})
    cfg = ModelConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.name = "other"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {grid: {xbound: [-10, 10, 0.3]}}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)


def test_config_checks_its_consistency():
    with pytest.raises(pydantic.ValidationError, match="fuser"):
        ModelConfig(lidar={})
    with pytest.raises(pydantic.ValidationError, match="head"):
        ModelConfig(heads={"detection": None})
    with pytest.raises(pydantic.ValidationError, match="partition"):
        ModelConfig(heads={"detection": {"tasks": [["car"], ["car", "bus"]]}})
    with pytest.raises(pydantic.ValidationError, match="both"):
        ModelConfig(fuser={})
    with pytest.raises(pydantic.ValidationError, match="own temporal"):
        ModelConfig(view_transform={"type": "deform"}, temporal={})


def test_unknown_variant_names_the_choices():
    cfg = load_config(CONFIGS / "bevdet-synth.yaml")
    cfg = ModelConfig(**{**cfg.model_dump(), "neck": {"type": "bifpn"}})
    with pytest.raises(ValueError, match="fpn"):
        build_model(cfg)
    assert set(VIEW_TRANSFORMS) == {"lss", "lss_camera_aware", "lss_depth", "bilinear", "deform"}


def test_bevfusion_branches_check_their_settings():
    base = load_config(CONFIGS / "bevfusion-synth.yaml").model_dump()
    with pytest.raises(pydantic.ValidationError, match="voxel_size"):
        ModelConfig(**{**base, "lidar": {**base["lidar"], "voxel_size": None}})
    with pytest.raises(ValueError, match="1/8 of the BEV cell"):
        build_model(ModelConfig(**{**base, "lidar": {**base["lidar"], "voxel_size": (0.2, 0.2, 0.2)}}))
    with pytest.raises(ValueError, match="z levels"):
        build_model(ModelConfig(**{**base, "lidar": {**base["lidar"], "channels": 33}}))
    with pytest.raises(ValueError, match="downsample is for"):
        build_model(ModelConfig(**{**base, "view_transform": {**base["view_transform"], "type": "bilinear"}}))
    model = build_model(ModelConfig(**base))
    # The camera branch pools on a grid twice as fine and reduces it to the model's grid.
    assert model.view_transform.pool_grid.shape == (64, 64) and model.cfg.grid.shape == (32, 32)
    assert model.lidar.sparse_shape == (41, 256, 256)


def test_lidar_depth_image_keeps_the_nearest_point_per_pixel():
    from bevkit.models.view_transforms import lidar_depth_image

    k = torch.tensor([[[[100.0, 0, 32], [0, 100.0, 16], [0, 0, 1]]]])  # (1, 1, 3, 3), a 64 x 32 image
    aug = torch.eye(3).view(1, 1, 3, 3)
    ego_from_cam = torch.eye(4).view(1, 1, 4, 4)  # camera frame = ego frame: z is the depth
    pts = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 5.0], [0.5, 0.2, 10.0], [0.0, 0.0, -3.0], [50.0, 0, 1.0]])
    img = lidar_depth_image([pts], k, aug, ego_from_cam, (32, 64))
    assert img.shape == (1, 1, 1, 32, 64)
    assert img[0, 0, 0, 16, 32] == 5.0  # two points on the optical axis: the nearer one
    assert img[0, 0, 0, 18, 37] == 10.0  # (0.5, 0.2) at 10 m -> pixel (32 + 5, 16 + 2)
    assert int((img > 0).sum()) == 2  # behind the camera and outside the image: nothing


def test_backbone_loads_a_local_checkpoint_with_weights_only(tmp_path):
    torch.manual_seed(0)
    src = TimmBackbone("resnet10t", (3, 4))
    path = tmp_path / "r10t.pth"
    torch.save({"state_dict": {**src.body.state_dict(), "fc.weight": torch.zeros(3, 3)}}, path)
    dst = TimmBackbone("resnet10t", (3, 4))
    x = torch.randn(1, 3, 64, 64)
    src.eval(), dst.eval()
    assert not torch.allclose(src(x)[-1], dst(x)[-1])
    dst.load_checkpoint(path)
    torch.testing.assert_close(src(x)[-1], dst(x)[-1])
    other = tmp_path / "r18.pth"
    torch.save(TimmBackbone("resnet18", (3, 4)).body.state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        dst.load_checkpoint(other)
    pickled = tmp_path / "obj.pth"
    torch.save({"model": object()}, pickled)
    with pytest.raises(pickle.UnpicklingError):
        dst.load_checkpoint(pickled)  # weights_only refuses arbitrary objects


def test_build_loads_the_configured_checkpoint(tmp_path):
    cfg = load_config(CONFIGS / "bevdet-synth.yaml")
    torch.manual_seed(1)
    ref = build_model(cfg)
    path = tmp_path / "backbone.pth"
    torch.save(ref.backbone.body.state_dict(), path)
    cfg = ModelConfig(**{**cfg.model_dump(), "backbone": {**cfg.backbone.model_dump(), "checkpoint": str(path)}})
    torch.manual_seed(2)
    model = build_model(cfg)
    for (k, a), b in zip(ref.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_temporal_state_is_passed_in_and_out():
    cfg = load_config(CONFIGS / "bevdet4d-synth.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)  # train mode: batch statistics keep the random network's signals O(1)
    batch = make_batch(cfg, n_cams=1, batch=2)
    before = dict(vars(model))
    with torch.no_grad():
        first = model(batch)  # no history: the current BEV stands in for the previous frame
        state = first["bev"].unsqueeze(1)  # (B, T-1, C, Y, X)
        still = model({**batch, "prev_bev": state, "curr_from_prev": torch.eye(4).expand(2, 1, 4, 4)})
        moved_tf = torch.eye(4).expand(2, 1, 4, 4).clone()
        moved_tf[:, 0, 0, 3] = 1.6  # the ego drove 1.6 m forward since the previous keyframe
        moved = model({**batch, "prev_bev": state, "curr_from_prev": moved_tf})
    assert vars(model).keys() == before.keys()  # nothing was stored on the module
    a = first["detection"][0]["heatmap"]
    torch.testing.assert_close(still["detection"][0]["heatmap"], a)
    assert (moved["detection"][0]["heatmap"] - a).abs().max() > 1e-2 * a.std()
    with pytest.raises(ValueError, match="history"):
        model({**batch, "prev_bev": torch.cat([state, state], 1), "curr_from_prev": torch.eye(4).expand(2, 2, 4, 4)})


def test_bevformer_reads_the_previous_bev_aligned_by_ego_motion():
    cfg = load_config(CONFIGS / "bevformer-synth.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=1)
    batch = make_batch(cfg, n_cams=1, batch=2)
    before = dict(vars(model))
    with torch.no_grad():
        first = model(batch)
        state = first["bev"].unsqueeze(1)
        still = model({**batch, "prev_bev": state, "curr_from_prev": torch.eye(4).expand(2, 1, 4, 4)})
        moved_tf = torch.eye(4).expand(2, 1, 4, 4).clone()
        moved_tf[:, 0, 1, 3] = 2.4  # sideways by three cells
        moved = model({**batch, "prev_bev": state, "curr_from_prev": moved_tf})
    assert vars(model).keys() == before.keys()
    assert still["bev"].shape == first["bev"].shape == (2, 32, 32, 32)
    for a, b in ((first, still), (still, moved)):
        assert (a["bev"] - b["bev"]).abs().max() > 1e-2 * a["bev"].std()


def _mirror_batch(cfg):
    batch = make_batch(cfg, n_cams=2, batch=1)
    cams = batch["ego_from_cam"].clone()
    cams[..., 1, 3] += 0.0137  # off the cell boundary y = 0, where a mirrored point would change cells
    return {**batch, "ego_from_cam": cams}, torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])).unsqueeze(0)


def test_lift_splat_bev_follows_the_bev_augmentation():
    """Under a BEV augmentation (here a mirror across the x axis, as ``flip_y``) the targets move into the
    augmented frame; the camera BEV must move with them: the plain one mirrored along Y."""
    cfg = load_config(CONFIGS / "bevdet-synth.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch, mirror = _mirror_batch(cfg)
    seen = []
    hook = model.view_transform.register_forward_hook(lambda module, args, out: seen.append(out[0].detach()))
    with torch.no_grad():
        model.encode({**batch, "bev_aug": torch.eye(4).unsqueeze(0)})
        model.encode({**batch, "bev_aug": mirror})
    hook.remove()
    plain, mirrored = seen
    assert plain.abs().max() > 0 and not torch.allclose(mirrored, plain, atol=1e-3)
    torch.testing.assert_close(mirrored, plain.flip(-2), rtol=1e-4, atol=1e-5)


def test_depth_labels_are_unchanged_by_a_bev_augmentation():
    """Points and cameras both move into the augmented frame (rotation, scale, mirror): every pixel keeps
    its LiDAR depth label."""
    import math

    from bevkit.models.bev_model import camera_geometry
    from bevkit.models.view_transforms import depth_targets

    cfg = load_config(CONFIGS / "bevdepth-synth.yaml")
    batch = make_batch(cfg, n_cams=2, batch=1)
    c, s_, k = math.cos(0.4), math.sin(0.4), 1.07
    aug = torch.tensor([[k * c, -k * s_, 0, 0], [-k * s_, -k * c, 0, 0], [0, 0, k, 0], [0, 0, 0, 1.0]])[None]
    moved = [torch.cat([p[:, :3] @ aug[0, :3, :3].T, p[:, 3:]], 1) for p in batch["points"]]
    args = ((16, 44), 4, (1.0, 40.0, 0.5))  # 64 x 176 images at stride 4
    plain = depth_targets(batch["points"], *camera_geometry({**batch, "bev_aug": torch.eye(4)[None]}), *args)
    auged = depth_targets(moved, *camera_geometry({**batch, "bev_aug": aug}), *args)
    assert (plain >= 0).sum() > 20 and torch.equal(plain, auged)


def test_bevformer_queries_look_where_the_augmented_cell_is():
    """BEVFormer's spatial cross-attention: under the mirror, the query of cell (iy, ix) samples the
    cameras where the plain query of cell (Y - 1 - iy, ix) does."""
    from bevkit.models.bevformer import SpatialCrossAttention

    cfg = load_config(CONFIGS / "bevformer-synth.yaml")
    model = build_model(cfg, num_cameras=2).eval()
    batch, mirror = _mirror_batch(cfg)
    seen = []
    sca = next(m for m in model.modules() if isinstance(m, SpatialCrossAttention))
    hook = sca.register_forward_pre_hook(lambda module, args: seen.append((args[2].detach(), args[3].detach())))
    with torch.no_grad():
        model.encode({**batch, "bev_aug": torch.eye(4).unsqueeze(0)})
        model.encode({**batch, "bev_aug": mirror})
    hook.remove()
    (ref0, seen0), (ref1, seen1) = seen[0], seen[-1]  # (B, N, Q, Z, 2), (B, N, Q, Z)
    ny, nx = cfg.grid.shape
    flip = lambda t: t.unflatten(2, (ny, nx)).flip(2).flatten(2, 3)  # noqa: E731
    assert seen0.any() and torch.equal(seen1, flip(seen0))
    torch.testing.assert_close(torch.where(seen1[..., None], ref1, 0), torch.where(seen1[..., None], flip(ref0), 0),
                               rtol=1e-4, atol=1e-5)


def test_bevformer_aligns_the_previous_bev_by_the_motion_it_is_given():
    """The previous map the temporal attention reads: a blob one keyframe ago at (x, y) is now at
    curr_from_prev @ (x, y), here 2.4 m (three cells) to the left and 1.6 m (two cells) back."""
    from bevkit.models.bevformer import TemporalSelfAttention

    cfg = load_config(CONFIGS / "bevformer-synth.yaml")
    model = build_model(cfg, num_cameras=1)
    batch = make_batch(cfg, n_cams=1, batch=1)
    seen = []
    tsa = next(m for m in model.modules() if isinstance(m, TemporalSelfAttention))
    hook = tsa.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    prev_bev = torch.zeros(1, 1, 32, 32, 32)
    prev_bev[0, 0, :, 10, 20] = 1.0  # cell (iy 10, ix 20): x = -12.8 + 20.5 * 0.8 = 3.6, y = -4.4
    motion = torch.eye(4).view(1, 1, 4, 4).clone()
    motion[0, 0, 0, 3], motion[0, 0, 1, 3] = -1.6, 2.4
    with torch.no_grad():
        model({**batch, "prev_bev": prev_bev, "curr_from_prev": motion})
    hook.remove()
    aligned = seen[0][0].sum(-1).view(32, 32)  # (Y, X) over channels
    assert aligned.argmax().item() == 13 * 32 + 18  # (iy 13, ix 18)
    assert aligned.max() == pytest.approx(32.0, rel=1e-5) and aligned.sum() == pytest.approx(32.0, rel=1e-5)


def test_bevdet4d_concatenates_each_history_frame_warped_by_its_own_motion():
    from bevkit.models.config import GridConfig
    from bevkit.models.temporal import BEVDet4D

    grid = GridConfig(xbound=(-4.0, 4.0, 1.0), ybound=(-4.0, 4.0, 1.0), zbound=(-5.0, 3.0, 8.0))
    fuse = BEVDet4D(grid, channels=1, frames=3)
    bev = torch.zeros(1, 1, 8, 8)
    prev = torch.zeros(1, 2, 1, 8, 8)
    prev[0, 0, 0, 4, 4] = 1.0  # one keyframe ago: a blob at cell (iy 4, ix 4) = (x 0.5, y 0.5)
    prev[0, 1, 0, 4, 4] = 2.0  # two keyframes ago: the same place in that frame
    motion = torch.eye(4).expand(1, 2, 4, 4).clone()
    motion[0, 0, 0, 3] = -1.0  # curr_from_prev: that frame's x = 0.5 is the current x = -0.5 (ix 3)
    motion[0, 1, 1, 3] = -2.0  # y = 0.5 there is the current y = -1.5 (iy 2)
    out = fuse(bev, prev, motion)
    assert out.shape == (1, 3, 8, 8)
    assert (out[0, 1] == 1.0).nonzero().tolist() == [[4, 3]]
    assert (out[0, 2] == 2.0).nonzero().tolist() == [[2, 4]]
    assert out[0, 0].abs().sum() == 0


def test_ego_motion_between_keyframes():
    import math

    from bevkit.models.temporal import curr_from_prev

    def pose(x, y, yaw):
        m = torch.eye(4, dtype=torch.float64)
        m[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        m[0, 3], m[1, 3] = x, y
        return m

    # Far from the origin (real global coordinates): the previous pose is 2 m behind the current one along
    # the current heading (yaw 90 deg), so a point at the previous ego origin is at x = -2 now.
    curr = pose(1000.0, 2000.0, math.pi / 2)[None]
    prev = pose(1000.0, 1998.0, math.pi / 2)[None]
    m = curr_from_prev(curr, prev)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m[0, :3, 3], torch.tensor([-2.0, 0.0, 0.0]))
    torch.testing.assert_close(m[0, :3, :3], torch.eye(3))
    assert curr_from_prev(curr, torch.stack([prev, curr], 1)).shape == (1, 2, 4, 4)


def test_bevformer_deform_attn_switch_gives_the_same_outputs_and_gradients():
    # view_transform.deform_attn picks the implementation (the memory benchmarks compare them); every
    # choice must give the fast path's outputs and gradients, and an unknown name is an error.
    from bevkit.ops import deform_attn_reference

    cfg = load_config(CONFIGS / "bevformer-synth.yaml")
    runs = {}
    for impl in ("fast", "reference", "exportable"):
        vt = cfg.view_transform.model_copy(update={"deform_attn": impl})
        torch.manual_seed(0)
        model = build_model(cfg.model_copy(update={"view_transform": vt}), num_cameras=2)
        with torch.no_grad():  # non-zero offsets and weights, so samples fall between cells
            for layer in model.view_transform.layers:
                for attn in (layer.tsa, layer.sca):
                    attn.offsets.weight.normal_(0.0, 0.05)
                    attn.weights.weight.normal_(0.0, 0.05)
        batch = make_batch(cfg, n_cams=2, batch=2)
        with torch.no_grad():
            state = model(batch)["bev"].unsqueeze(1)
        motion = torch.eye(4).expand(2, 1, 4, 4).clone()
        motion[:, 0, 0, 3] = 1.3  # moved forward by a fraction of a cell
        out = model({**batch, "prev_bev": state, "curr_from_prev": motion})
        out["bev"].square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.view_transform.named_parameters()
                 if "offsets" in n or "weights" in n}
        runs[impl] = (out["bev"].detach(), grads, model)
    assert runs["reference"][2].view_transform.layers[0].sca.impl is deform_attn_reference
    fast_bev, fast_grads, _ = runs["fast"]
    for impl in ("reference", "exportable"):
        bev, grads, _ = runs[impl]
        torch.testing.assert_close(bev, fast_bev, rtol=1e-4, atol=1e-5)
        for name, g in fast_grads.items():
            assert g.abs().max() > 0, name  # the location / weight gradients are exercised
            torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-6, msg=f"{impl} {name}")
    bad = cfg.view_transform.model_copy(update={"deform_attn": "cuda"})
    with pytest.raises(ValueError, match="deform_attn"):
        build_model(cfg.model_copy(update={"view_transform": bad}))


def test_bevformer_embeds_each_camera_and_loads_a_shared_embedding():
    """One learned embedding per camera (BEVFormer's ``cams_embeds``). With distinct rows, swapping the
    two cameras (images and calibrations together) changes the BEV; with equal rows the encoder cannot
    tell them apart and the BEV is unchanged. A state dict with the older embedding shared by every
    camera, (1, 1, C, 1, 1), loads as that embedding in each row. Another number of cameras is refused."""
    from bevkit.config import ConfigError, experiment_from_dict

    cfg = load_config(CONFIGS / "bevformer-synth.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, num_cameras=2).eval()
    vt = model.view_transform
    assert vt.cam_embed.shape == (2, vt.channels)
    batch = make_batch(cfg, n_cams=2, batch=1)
    per_camera = ("images", "intrinsics", "img_aug", "ego_from_cam")
    swapped = {**batch, **{k: batch[k].flip(1) for k in per_camera}}
    with torch.no_grad():
        vt.cam_embed.copy_(torch.randn(2, vt.channels))
        plain, other = model(batch)["bev"], model(swapped)["bev"]
        assert (plain - other).abs().max() > 1e-2 * plain.std()
        shared = torch.randn(1, 1, vt.channels, 1, 1)
        model.load_state_dict({**model.state_dict(), "view_transform.cam_embed": shared})
        assert torch.equal(vt.cam_embed, shared.view(1, -1).expand(2, -1))
        torch.testing.assert_close(model(swapped)["bev"], model(batch)["bev"], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="num_cameras"):
            model(make_batch(cfg, n_cams=1, batch=1))
    doc = {"model": {"view_transform": {"type": "deform", "num_cameras": 6}},
           "data": {"cameras": ["CAM_FRONT", "CAM_BACK"]}}
    with pytest.raises(ConfigError, match="num_cameras is 6 but data.cameras lists 2"):
        experiment_from_dict(doc)
    doc["model"]["view_transform"]["num_cameras"] = 2
    assert experiment_from_dict(doc).model.view_transform.num_cameras == 2
