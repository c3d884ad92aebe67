"""Reading checkpoints safely: ``weights_only=True``, clear errors, and a model from a checkpoint alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from bevkit.config import ConfigError, ExperimentConfig, experiment_from_dict
from bevkit.models.bev_model import BEVModel
from bevkit.models.build import build_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def read_checkpoint(path) -> dict:
    """The checkpoint dict, loaded with ``weights_only=True`` (no arbitrary unpickling).

    Raises ``CheckpointError`` naming the file when it is missing, truncated, not a PyTorch file, or
    not a bevkit checkpoint (no ``bevkit`` entry with the resolved config).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (zip, unpickler, storage)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): "
                              f"{first}") from None
    if not isinstance(ckpt, dict) or "bevkit" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a bevkit checkpoint (no 'bevkit' config entry; found {keys})")
    return ckpt


def checkpoint_config(path, ckpt: dict | None = None) -> ExperimentConfig:
    """The resolved experiment config a checkpoint carries."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    try:
        return experiment_from_dict(ckpt["bevkit"]["config"], f"{path} (its saved config)")
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its saved config does not validate with this bevkit: {e}") from None


def model_state(ckpt: dict, ema: bool = True) -> dict:
    """The ``BEVModel`` state dict of a checkpoint: the EMA weights if present and asked for."""
    if ema and "ema" in ckpt:
        return dict(ckpt["ema"])
    prefix = "model."
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def build_experiment_model(cfg: ExperimentConfig, load_checkpoint: bool = True) -> BEVModel:
    """``build_model`` for an experiment, with the settings it rejects (a voxel size that does not
    divide the BEV cell, an unknown variant name, a missing backbone checkpoint...) reported as a
    ``ConfigError`` naming the model, so the CLI prints one line instead of a traceback."""
    try:
        return build_model(cfg.model, load_checkpoint=load_checkpoint, num_cameras=len(cfg.data.cameras))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model {cfg.model.name!r}: {e}") from None


def load_model(path, ema: bool = True) -> tuple[ExperimentConfig, BEVModel]:
    """Rebuild the model from a checkpoint alone (config and weights), in eval mode on the CPU; its
    ``loaded_weights`` says which weights were loaded ("ema" only when asked for and present)."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(path, ckpt)
    model = build_experiment_model(cfg, load_checkpoint=False)
    try:
        model.load_state_dict(model_state(ckpt, ema))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                              f"{str(e).splitlines()[0]}") from None
    model.loaded_weights = "ema" if ema and "ema" in ckpt else "raw"  # what was loaded, for the record
    return cfg, model.eval()


def init_weights(model: BEVModel, path) -> list[str]:
    """Load a checkpoint's weights (its EMA if it has one) into ``model`` to start a new run.

    Every checkpoint tensor must exist in the model with the same shape; model tensors the checkpoint
    lacks keep their initialisation. Returns the names of those fresh tensors.
    """
    state = model_state(read_checkpoint(path), ema=True)
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} of its tensors are not in this model "
                              f"(e.g. {', '.join(unknown[:3])}); init_from needs the same architecture plus "
                              f"optional new modules")
    misfit = sorted(k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape))
    try:  # a module may upgrade an older layout of its tensors while loading (BEVFormer's camera embedding)
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        if not misfit:
            raise CheckpointError(f"{path}: weights do not fit the model: {_first_problem(e)}") from None
        k = next((k for k in misfit if f"for {k}:" in str(e)), misfit[0])  # one the model could not upgrade
        raise CheckpointError(f"{path}: {len(misfit)} tensors differ in shape from this model's "
                              f"(e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})") from None
    return sorted(k for k in own if k not in state)


def checked_state(cfg: ExperimentConfig, path) -> dict:
    """The weights (EMA if present) of a checkpoint that ``cfg`` describes: refused with a
    ``CheckpointError`` / ``ConfigError`` naming what differs when it is another model's."""
    ckpt = read_checkpoint(path)
    check_same_model(cfg, checkpoint_config(path, ckpt), path)
    return model_state(ckpt, ema=True)


def load_state(model: BEVModel, state: dict, path) -> BEVModel:
    """``model.load_state_dict(state)``, a mismatch reported as a one-line ``CheckpointError`` naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {_first_problem(e)}") from None
    return model


def _first_problem(e: RuntimeError) -> str:
    """The first line of a ``load_state_dict`` error that names a tensor (its first line only says where)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines[1:] if "size mismatch" in line or "key" in line.lower()),
                lines[0] if lines else type(e).__name__)


# Head settings used only when decoding predictions: they may differ from the checkpoint's (tuned at
# evaluation time) since no weight depends on them.
DECODE_ONLY = frozenset({"nms_radii", "score_threshold", "max_boxes", "max_per_task", "threshold"})


def check_same_model(cfg: ExperimentConfig, saved: ExperimentConfig, path) -> None:
    """The config given on the command line must describe the checkpoint's model (data may differ, and so
    may the heads' decoding settings, ``DECODE_ONLY``)."""
    a, b = cfg.to_dict()["model"], saved.to_dict()["model"]
    diff = sorted(d for d in _differences(a, b, "model")
                  if not (d.startswith("model.heads.") and d.rsplit(".", 1)[-1] in DECODE_ONLY))
    if diff:
        raise CheckpointError(f"{path}: the config's model differs from the checkpoint's at {', '.join(diff[:6])}")
    vt = cfg.model.view_transform
    if vt is not None and vt.type == "deform" and tuple(cfg.data.cameras) != tuple(saved.data.cameras):
        raise CheckpointError(f"{path}: BEVFormer learned one embedding per camera of data.cameras "
                              f"{list(saved.data.cameras)} (in that order); the config lists {list(cfg.data.cameras)}")


def _differences(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _differences(a.get(k), b.get(k), f"{prefix}.{k}")
    elif a != b:
        yield prefix


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
