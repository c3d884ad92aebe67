"""Training, evaluation and prediction on Lightning around the plain models."""

from bevkit.engine.checkpoint import CheckpointError, load_model, read_checkpoint
from bevkit.engine.runner import evaluate, predict, train

__all__ = ["CheckpointError", "evaluate", "load_model", "predict", "read_checkpoint", "train"]
