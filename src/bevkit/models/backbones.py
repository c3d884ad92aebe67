"""Image backbones through timm: ``features_only``, no download, local checkpoints only."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn


class TimmBackbone(nn.Module):
    """A timm model as a multi-scale feature extractor.

    ``channels`` and ``strides`` declare the output maps, so necks are wired from them. Weights
    are random; :meth:`load_checkpoint` reads pretrained ones from a local file (never pickle).
    """

    def __init__(self, name: str, out_indices: tuple[int, ...], img_size: tuple[int, int] | None = None):
        super().__init__()
        self.name = name
        kwargs = {} if img_size is None else {"img_size": tuple(img_size)}
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices),
                                      **kwargs)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        # Transformers (Swin) hand out channels-last maps; the necks take channels-first.
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, images: Tensor) -> list[Tensor]:
        """Features of normalised images.

        Shapes:
            images: (B, 3, H, W) float   returns: one (B, C_i, H / s_i, W / s_i) per out index
        """
        feats = self.body(images)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats

    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights from a local state dict (``torch.load(..., weights_only=True)``).

        Accepts a plain state dict or one wrapped in ``state_dict`` / ``model``; a classifier
        (``fc.*``, ``head.*``...) absent from the features-only body is ignored. Every parameter
        of the body must be present with its shape, otherwise a ``ValueError`` names them.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        own = self.body.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise ValueError(f"{path}: does not fit backbone {self.name}: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, wrong shape {wrong[:5]}")
        self.body.load_state_dict({k: state[k] for k in own}, strict=True)
