"""Experiment configs and checkpoints: clear errors, safe loading, a model from a checkpoint alone."""

import json

import pytest
import torch
from engine_helpers import tiny_experiment, write_yaml

from bevkit.config import ConfigError, ExperimentConfig, load_experiment
from bevkit.engine import CheckpointError, load_model, read_checkpoint
from bevkit.engine.module import lr_factor


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    doc = tiny_experiment(tmp_path, tmp_path / "run")
    doc["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_experiment(write_yaml(tmp_path / "a.yaml", doc))
    doc = tiny_experiment(tmp_path, tmp_path / "run")
    doc["model"]["lidar"]["channels"] = "many"
    with pytest.raises(ConfigError, match=r"model\.lidar\.channels"):
        load_experiment(write_yaml(tmp_path / "b.yaml", doc))
    with pytest.raises(ConfigError, match=r"no such config file"):
        load_experiment(tmp_path / "missing.yaml")


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  root: [a, b\nmodel: {}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert "\n" not in str(e.value) and "not valid YAML" in str(e.value) and "line 3, column 6" in str(e.value)
    with pytest.raises(ConfigError, match="value is not valid YAML .*line 1") as e:
        load_experiment(write_yaml(tmp_path / "c.yaml", tiny_experiment(tmp_path, tmp_path / "run")), ["a.b=[1,"])
    assert "\n" not in str(e.value)


def test_overrides_are_typed_and_checked(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_experiment(tmp_path, tmp_path / "run"))
    cfg = load_experiment(path, ["train.epochs=3", "data.sweeps=2", "model.heads.detection.channels=4"])
    assert (cfg.train.epochs, cfg.data.sweeps, cfg.model.heads.detection.channels) == (3, 2, 4)
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_experiment(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_experiment(path, ["train.epochs"])
    assert load_experiment(path, ["eval.max_range=12.8"]).eval.max_range == 12.8
    with pytest.raises(ConfigError, match=r"eval\.max_range"):
        load_experiment(path, ["eval.max_range=-1"])
    # Sizes and weights that cannot build a model are refused by the schema, naming the section.
    for override, words in (("model.heads.detection.channels=-3", r"heads\.detection.*channels must be at least 1"),
                            ("model.lidar.channels=0", r"lidar.*channels must be at least 1"),
                            ("model.heads.detection.reg_weight=-1", "reg_weight must not be negative")):
        with pytest.raises(ConfigError, match=words):
            load_experiment(path, [override])
    # The resolved config round-trips through plain JSON (what checkpoints carry).
    assert ExperimentConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_shipped_preset_validates_as_an_experiment():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_experiment(path)


def test_schedules_follow_their_definitions():
    from bevkit.config import Schedule

    step = Schedule(type="step", milestones=(0.5, 0.75), gamma=0.1, warmup_steps=10, warmup_ratio=0.1)
    assert lr_factor(0, 100, step) == pytest.approx(0.1)
    assert lr_factor(5, 100, step) == pytest.approx(0.55)
    assert lr_factor(40, 100, step) == pytest.approx(1.0)
    assert lr_factor(60, 100, step) == pytest.approx(0.1)
    assert lr_factor(80, 100, step) == pytest.approx(0.01)
    cyc = Schedule(type="cyclic", peak=10.0, up_fraction=0.4, final=1e-4)
    assert lr_factor(0, 100, cyc) == pytest.approx(1.0)
    assert lr_factor(40, 100, cyc) == pytest.approx(10.0)
    assert lr_factor(100, 100, cyc) == pytest.approx(1e-4)
    values = [lr_factor(s, 100, cyc) for s in range(101)]
    assert values.index(max(values)) == 40
    cos = Schedule(type="cosine", final=0.0)
    assert lr_factor(50, 100, cos) == pytest.approx(0.5)


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(trained_run, tiny_root):
    _, ckpt = trained_run
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # no arbitrary unpickling needed
    assert raw["bevkit"]["config"]["model"]["name"] == "pp-test"
    assert "ema" in raw and raw["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    cfg, model = load_model(ckpt)
    assert cfg.model.name == "pp-test" and not model.training
    # The rebuilt model carries the EMA weights the checkpoint holds.
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["ema"][k]), k


def test_truncated_and_foreign_checkpoints_are_named(trained_run, tmp_path):
    _, ckpt = trained_run
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        read_checkpoint(cut)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.ckpt: not a bevkit checkpoint"):
        read_checkpoint(foreign)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt"):
        read_checkpoint(text)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_the_run_folder_keeps_last_and_the_best_after_validation(trained_run):
    _, last = trained_run
    names = sorted(p.name for p in last.parent.glob("*.ckpt"))
    assert names == ["best-epoch000.ckpt", "last.ckpt"], names
    cfg, model = load_model(last.parent / "best-epoch000.ckpt")
    assert cfg.model.name == "pp-test" and sum(p.numel() for p in model.parameters()) > 0


def test_config_digest_ignores_later_components_left_unset():
    # A BEV feature cache is keyed by ExperimentConfig.digest(); keys added to the model config later
    # (map_prior, view_transform.depth_net) must not change the digest of configs that leave them unset,
    # or every existing cache would be refused. The figure is the default config's digest before they existed.
    from bevkit.config import ExperimentConfig

    cfg = ExperimentConfig()
    assert cfg.digest() == "fb5e5a7535fb77897ce03285496f15b849b369062357ff27fbcf074103f63c22"
    with_prior = ExperimentConfig(**{**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "map_prior": {}}})
    deeper = cfg.to_dict()
    deeper["model"]["view_transform"]["depth_net"] = "bevdepth"
    assert len({cfg.digest(), with_prior.digest(), ExperimentConfig(**deeper).digest()}) == 3


def test_ema_follows_the_ramped_decay(tmp_path, tiny_root, monkeypatch):
    """``ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t`` with ``d_t = ema * (1 - exp(-t / 2000))``; buffers copied."""
    import math

    from bevkit.engine.module import BEVLitModule

    cfg = ExperimentConfig(**tiny_experiment(tiny_root, tmp_path / "run", ema=0.99))
    module = BEVLitModule(cfg)
    step = [0]
    monkeypatch.setattr(BEVLitModule, "global_step", property(lambda self: step[0]))
    name, param = next((k, v) for k, v in module.model.named_parameters() if v.numel() > 1)
    floats = {k for k, v in module.model.state_dict().items() if v.dtype.is_floating_point}
    module._update_ema()  # the first call copies the weights
    expected = param.detach().clone()
    for t, value in ((1, 1.0), (2, -3.0), (5000, 2.0), (30000, 0.5)):
        step[0] = t
        with torch.no_grad():
            param.fill_(value)
        module._update_ema()
        d = 0.99 * (1 - math.exp(-t / 2000)) if t < 20000 else 0.99
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(module.ema[name], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(module.ema[name], param.detach())  # an average, not a copy
    ints = [k for k, v in module.model.state_dict().items() if k not in floats]
    assert ints
    for k in ints:  # counters (e.g. batch-norm batches seen) are copied, not averaged
        assert torch.equal(module.ema[k], module.model.state_dict()[k])


def test_weight_decay_spares_norms_and_biases(tmp_path, tiny_root, monkeypatch):
    from bevkit.engine.module import BEVLitModule

    cfg = ExperimentConfig(**tiny_experiment(tiny_root, tmp_path / "run", weight_decay=0.5, lr=0.1,
                                             optimizer="adamw"))
    module = BEVLitModule(cfg)
    monkeypatch.setattr(BEVLitModule, "total_steps", lambda self: 10)
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0
    names = dict(module.model.named_parameters())
    norms = [n for n, m in module.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(id(names[f"{n}.weight"]) not in decayed for n in norms)
    assert all((id(p) in decayed) == (p.ndim > 1) for p in names.values())
    # One step with zero gradients: only the decayed tensors move (AdamW's decoupled decay).
    before = {n: p.detach().clone() for n, p in names.items()}
    for p in names.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in names.items():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (p.ndim > 1 and bool(before[n].abs().sum() > 0)), n


def test_trainer_takes_clipping_accumulation_and_precision(tmp_path, tiny_root):
    from bevkit.engine.runner import make_trainer

    cfg = ExperimentConfig(**tiny_experiment(tiny_root, tmp_path / "run", grad_clip=3.5, accumulate=2,
                                             precision="bf16"))
    trainer = make_trainer(cfg, tmp_path / "run", fit=False, progress=False)
    assert trainer.gradient_clip_val == 3.5 and trainer.accumulate_grad_batches == 2
    assert trainer.precision == "bf16-mixed"


def test_class_map_renames_categories_for_the_reader(tmp_path, tiny_root):
    from bevkit.engine.data import BEVDataModule

    doc = tiny_experiment(tiny_root, tmp_path / "run")
    plain = BEVDataModule(ExperimentConfig(**doc)).dataset("mini_val", train=False)
    # A T4-style dataset: its own category names; here every car is read as a truck and nothing else is kept.
    doc["data"]["class_map"] = {"vehicle.car": "truck"}
    mapped = BEVDataModule(ExperimentConfig(**doc)).dataset("mini_val", train=False)
    car, truck = plain.base.class_index["car"], plain.base.class_index["truck"]
    cars = 0
    for i in range(len(plain.base)):
        a, b = plain.base[i], mapped.base[i]
        assert b["labels"].tolist() == [truck] * int((a["labels"] == car).sum())
        assert torch.equal(b["boxes"], a["boxes"][a["labels"] == car])
        cars += int((a["labels"] == car).sum())
        assert len(a["labels"]) > int((a["labels"] == car).sum())  # other classes were there, and are dropped
    assert cars > 0


def test_per_camera_embeddings_keep_cache_keys_and_tie_checkpoints_to_their_cameras():
    from pathlib import Path

    from bevkit.cache.manifest import config_hash
    from bevkit.config import experiment_from_dict
    from bevkit.engine.checkpoint import check_same_model, load_state
    from bevkit.models import build_model

    configs = Path(__file__).resolve().parents[2] / "configs"
    bevformer = load_experiment(configs / "bevformer-synth.yaml")
    # Feature caches are keyed by config_hash: configs that leave view_transform.num_cameras unset keep the
    # keys they had before it existed (their checkpoints load as the same function), so their caches stay.
    assert config_hash(ExperimentConfig()) == "8919c4eeeaf322c42bc540801769223b2f5023f769cad38fc909e9210bbe93d7"
    assert config_hash(bevformer) == "f3ba5455aea9d6b1518335afa8d1badec1fa01c9fa4b6958ee047b22833a4c63"
    with pytest.raises(ConfigError, match="num_cameras is for the deform"):
        experiment_from_dict({"model": {"view_transform": {"num_cameras": 2}}})
    # A BEVFormer checkpoint's embeddings belong to its cameras in their order.
    doc = bevformer.to_dict()
    doc["data"]["cameras"] = doc["data"]["cameras"][::-1]
    check_same_model(bevformer, bevformer, "run.ckpt")
    with pytest.raises(CheckpointError, match=r"one embedding per camera of data.cameras \['CAM_FRONT', 'CAM_BACK'\]"):
        check_same_model(experiment_from_dict(doc), bevformer, "run.ckpt")
    # Weights that do not fit name the tensor, not just the model.
    state = build_model(bevformer.model, num_cameras=2).state_dict()
    with pytest.raises(CheckpointError, match=r"run.ckpt: weights do not fit the model: .*view_transform.cam_embed"):
        load_state(build_model(bevformer.model, num_cameras=3), state, "run.ckpt")
