"""The experiment schema: one typed, frozen config for model, data, training and evaluation.

A YAML preset in ``configs/`` holds only what differs from the defaults; ``--set a.b=v`` overrides
any key from the command line (``v`` is read as YAML). Unknown keys and wrong types are errors that
name the key::

    cfg = load_experiment("configs/pointpillars-synth.yaml", ["train.epochs=2", "data.batch_size=2"])
    cfg.model        # ModelConfig (bevkit.models.config)
    cfg.to_dict()    # plain JSON-able dict; ExperimentConfig(**d) rebuilds it (what checkpoints carry)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bevkit.data.augment import BEVAugConfig, ImageAugConfig
from bevkit.data.nuscenes import CAMERAS, MAX_SWEEPS
from bevkit.models.config import ModelConfig

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A config that does not validate; the message names the file (if any) and every bad key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageAug(_Frozen):
    """BEVDet's image augmentation (training only); see ``bevkit.data.augment.ImageAugConfig``."""

    resize: tuple[float, float] = (-0.06, 0.11)
    rotate: tuple[float, float] = (-5.4, 5.4)
    flip: bool = True
    crop_h: tuple[float, float] = (0.0, 0.0)


class BEVAug(_Frozen):
    """BEV rotation (degrees), scaling and flips of the ego frame (training only)."""

    rotate: tuple[float, float] = (-22.5, 22.5)
    scale: tuple[float, float] = (0.95, 1.05)
    flip_x: float = 0.5
    flip_y: float = 0.5


class DataSection(_Frozen):
    """Where the data is and what a sample carries. ``root`` is relative to the working directory;
    ``version`` None takes the only version folder under it. Map and occupancy targets are served when
    the model has those heads."""

    root: str = "data/nuscenes"
    version: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    cameras: tuple[str, ...] = CAMERAS
    image_size: tuple[int, int] = (256, 704)
    sweeps: int = 0
    sweep_min_distance: float = 1.0  # sweep points this close to their sensor (|x|, |y| in its frame) are dropped
    img_aug: ImageAug | None = None
    bev_aug: BEVAug | None = None
    batch_size: int = 4
    eval_batch_size: int = 4
    workers: int = 2
    class_map: dict[str, str] | None = None  # category name -> detection class; None: nuScenes'

    @model_validator(mode="after")
    def _check(self):
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; nuScenes has {list(CAMERAS)}")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.workers < 0 or self.sweeps < 0:
            raise ValueError("batch sizes must be >= 1, workers and sweeps >= 0")
        if self.sweeps > MAX_SWEEPS:
            raise ValueError(f"sweeps: the index keeps {MAX_SWEEPS} previous sweeps per keyframe, got {self.sweeps}")
        if not self.sweep_min_distance >= 0:
            raise ValueError(f"sweep_min_distance must be >= 0 metres, got {self.sweep_min_distance}")
        return self


class Schedule(_Frozen):
    """Learning-rate schedule per optimizer step, after ``warmup_steps`` of linear warmup from
    ``warmup_ratio`` x lr.

    - ``step`` (BEVDet): lr x ``gamma`` at each fraction of training in ``milestones``;
    - ``cyclic`` (BEVFusion / CenterPoint, LiDAR): one cycle, cosine up to ``peak`` x lr over the first
      ``up_fraction`` of training, then cosine down to ``final`` x lr;
    - ``cosine`` (BEVFusion, camera): cosine from lr down to ``final`` x lr;
    - ``constant``.
    """

    type: Literal["step", "cyclic", "cosine", "constant"] = "step"
    warmup_steps: int = 0
    warmup_ratio: float = 1.0 / 3.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    peak: float = 10.0
    up_fraction: float = 0.4
    final: float = 1e-4


class TrainSection(_Frozen):
    """Optimisation and the Lightning trainer. ``precision``: ``32``, ``bf16`` (bf16-mixed) or
    ``16-mixed`` (CUDA only). ``checkpoint_every``: also keep a checkpoint every N optimizer steps
    (0: off); ``last.ckpt`` is refreshed then and at every epoch end. ``ema``: decay of the exponential
    moving average of the weights (None: off), used for evaluation and saved in checkpoints.
    ``init_from``: a bevkit checkpoint whose weights (its EMA if it has one) start a new run, as Neural
    Map Prior's second stage starts from the trained baseline: every tensor of it must fit the model;
    the model's tensors it lacks (e.g. a newly added map prior) keep their initialisation. Ignored
    when resuming. ``order``: how training visits samples: ``shuffle`` (a seeded permutation),
    ``scenes`` (scenes in a seeded order, each scene's keyframes in time order, as Neural Map Prior
    trains) or ``auto`` (``scenes`` for a model with a map prior, else ``shuffle``).
    ``drop_empty_boxes``: the training split's targets leave out annotations with no LiDAR and no
    radar point (mmdet3d's ``use_valid_flag``, as the upstream BEV repos train; the evaluation's
    ground truth drops them too); validation and evaluation read every box."""

    epochs: int = 24
    max_steps: int = -1
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 1e-2
    schedule: Schedule = Schedule()
    grad_clip: float | None = 35.0
    accumulate: int = 1
    ema: float | None = None
    precision: Literal["32", "bf16", "16-mixed"] = "32"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    checkpoint_every: int = 0
    val_every: int = 1
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    init_from: str | None = None
    order: Literal["auto", "shuffle", "scenes"] = "auto"
    drop_empty_boxes: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("train: epochs or max_steps must be positive")
        if self.accumulate < 1 or self.val_every < 1 or self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("train: accumulate, val_every, log_every >= 1 and checkpoint_every >= 0")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError("train: ema is a decay in (0, 1)")
        return self


class EvalSection(_Frozen):
    """How validation and ``bevkit eval`` score detections. ``max_range`` (m) caps every class range of
    ``detection_cvpr_2019`` for a model whose BEV grid is smaller than the benchmark's 30-50 m (the
    small synthetic presets); None, the default, is the benchmark as defined. ``map_prior``: how a model
    with a map prior is evaluated: ``online`` (the default, as Neural Map Prior) fills an empty global
    memory in the split's (scene, time) order while evaluating; ``train`` first fills it with the
    training split's drives (the model run over them in time order), then goes on online, as a prior
    built from earlier drives; ``empty`` reads an empty prior for every sample (every street seen for
    the first time), the ablation that shows what the memory adds."""

    max_range: float | None = Field(default=None, gt=0)
    map_prior: Literal["online", "train", "empty"] = "online"


# Model keys added after the first release (dotted paths); absent (None) they leave
# ``ExperimentConfig.digest`` unchanged.
OPTIONAL_SINCE_V1 = ("map_prior", "view_transform.depth_net", "heads.detr", "backbone.img_size", "lidar.voxel_size",
                     "lidar.base_channels", "lidar.zbound", "view_transform.downsample", "view_transform.num_cameras")


class ExperimentConfig(_Frozen):
    """Everything a run needs; ``out`` is the run folder (relative to the working directory)."""

    model: ModelConfig = ModelConfig()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    out: str = "runs/default"

    @model_validator(mode="after")
    def _cameras_match(self):
        vt = self.model.view_transform
        if vt is not None and vt.type != "deform" and vt.num_cameras is not None:
            raise ValueError(f"model.view_transform.num_cameras is for the deform (BEVFormer) view transform, "
                             f"not {vt.type!r}")
        if vt is not None and vt.type == "deform" and vt.num_cameras not in (None, len(self.data.cameras)):
            raise ValueError(f"model.view_transform.num_cameras is {vt.num_cameras} but data.cameras lists "
                             f"{len(self.data.cameras)}; BEVFormer learns one embedding per camera (leave "
                             f"num_cameras unset to take the number of data.cameras)")
        return self

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists) that ``ExperimentConfig(**d)`` rebuilds."""
        return json.loads(self.model_dump_json())

    def digest(self) -> str:
        """sha256 of the canonical JSON of the model and data sections (what produced a feature).

        Model components added after the first release (``OPTIONAL_SINCE_V1``) enter only when set, so
        an older config keeps its digest and its cached features stay valid; ``data.sweep_min_distance``
        enters only with sweeps (whose points it changes)."""
        d = self.to_dict()
        for key in OPTIONAL_SINCE_V1:
            *parents, leaf = key.split(".")
            node = d["model"]
            for k in parents:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get(leaf, 0) is None:
                node.pop(leaf)
        if not d["data"].get("sweeps"):  # without sweeps it changes nothing (and came after the first release)
            d["data"].pop("sweep_min_distance", None)
        canon = json.dumps({"model": d["model"], "data": d["data"]}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def image_aug(self) -> ImageAugConfig | None:
        a = self.data.img_aug
        if a is None:
            return None
        return ImageAugConfig(final_size=tuple(self.data.image_size), resize=a.resize, rotate=a.rotate,
                              flip=a.flip, crop_h=a.crop_h)

    def bev_aug(self) -> BEVAugConfig | None:
        a = self.data.bev_aug
        return None if a is None else BEVAugConfig(rotate=a.rotate, scale=a.scale, flip_x=a.flip_x, flip_y=a.flip_y)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where it is."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[list[str], object]]:
    """``["a.b=v", ...]`` -> ``[(["a", "b"], yaml value of v), ...]``."""
    out = []
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=2")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({_yaml_problem(e)})") from None
        out.append((key.strip().split("."), parsed))
    return out


def apply_overrides(doc: dict, overrides) -> dict:
    """Set each ``(path, value)`` in a nested dict (intermediate dicts are created)."""
    doc = json.loads(json.dumps(doc))  # a copy
    for path, value in parse_overrides(overrides):
        node = doc
        for k in path[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {k!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return doc


def experiment_from_dict(doc: dict, where: str = "config") -> ExperimentConfig:
    """Validate a plain dict (from YAML or a checkpoint)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(doc).__name__}")
    try:
        return ExperimentConfig(**doc)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None
    except ValueError as e:  # raised by a validator outside pydantic's wrapping
        raise ConfigError(f"{where}: {e}") from None


def load_experiment(path: str | Path, overrides=()) -> ExperimentConfig:
    """A YAML preset plus ``--set`` overrides, validated; an error names the file and every bad key."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    doc = apply_overrides(doc, overrides)
    doc.setdefault("out", f"runs/{path.stem}")
    return experiment_from_dict(doc, str(path))
