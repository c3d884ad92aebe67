"""Models: plain ``nn.Module``s composed on one BEV grid (see docs/models.md)."""

from bevkit.models.bev_model import BEVModel
from bevkit.models.build import build_model, load_config
from bevkit.models.config import ModelConfig

__all__ = ["BEVModel", "ModelConfig", "build_model", "load_config"]
