"""Autocast off for geometry: poses, projections and sampling positions computed in float32 at least."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def full_precision(like: Tensor):
    """A context with autocast off on ``like``'s device (a no-op on devices without autocast, e.g.
    ``meta``), for geometry and losses that half precision breaks: CUDA autocast runs matmuls in half,
    has no half ``linalg.inv`` and refuses ``binary_cross_entropy``. Callers cast inside with
    :func:`at_least_float32`."""
    if like.device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, enabled=False)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 (half floats round metres and pixels)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
