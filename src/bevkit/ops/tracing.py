"""Whether an op is being traced for export, so that it can take its exportable formulation."""

from __future__ import annotations

import torch


def exporting() -> bool:
    """True while ``torch.export`` traces the caller (``torch.onnx.export(..., dynamo=True)`` runs it)."""
    return getattr(torch.compiler, "is_exporting", lambda: False)()
