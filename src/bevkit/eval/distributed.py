"""Exact merging of metric state across ``torch.distributed`` processes (gloo on CPU, nccl on GPU).

Count metrics (map IoU, occupancy mIoU) hold int64 counts: an all-reduce sum is exact. Detection holds
per-sample predictions: they are all-gathered (``bevkit.eval.evaluator.gather_detections``).
"""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sum an integer count tensor over all processes; returns it unchanged when not distributed.

    The tensor goes to the backend's device (CUDA for nccl, CPU for gloo) and comes back to its own.
    """
    if not is_distributed():
        return counts
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    t = counts.to(device=device, dtype=torch.int64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.to(counts.device)
