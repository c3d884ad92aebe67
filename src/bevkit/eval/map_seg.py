"""HD-map segmentation IoU (divider, ped_crossing, boundary) as HDMapNet and Neural Map Prior report it.

Their ``get_batch_iou``: for each class, intersection and union of the predicted and ground-truth masks
counted over all pixels of the batch, summed over the dataset, IoU = intersection / union; mIoU is the
mean over the three classes. Predictions are the arg-max one-hot of logits with a background channel 0
(``masks_from_logits``); ground truth may overlap (a pixel may be divider and boundary).

Two deliberate differences, both documented in docs/eval.md: counts are int64 (their float32 sums
stop being exact past 2**24 pixels per class), and a class with an empty union (no GT, no prediction
anywhere) is NaN and left out of the mean, where their ``I / (U + 1e-7)`` gives 0 and pulls the mean
down; for non-empty classes the two agree to a relative 1e-7 / U.
"""

from __future__ import annotations

import math

import torch

from bevkit.eval.distributed import all_reduce_sum

MAP_CLASSES = ("divider", "ped_crossing", "boundary")


def masks_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """HDMapNet's ``onehot_encoding`` without the background channel.

    Shapes:
        logits: (B, K + 1, Y, X), channel 0 = background   returns: (B, K, Y, X) bool
    """
    best = logits.argmax(dim=1, keepdim=True)                           # (B, 1, Y, X)
    k = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    return best == k


class MapIoU:
    """Streaming per-class IoU; ``merge`` and ``sync`` (all-reduce) are exact."""

    def __init__(self, classes=MAP_CLASSES):
        self.classes = tuple(classes)
        self.intersection = torch.zeros(len(self.classes), dtype=torch.int64)
        self.union = torch.zeros(len(self.classes), dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Shapes:
            pred, target: (B, K, Y, X), bool or {0, 1}
        """
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != len(self.classes):
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                             f"(B, {len(self.classes)}, Y, X)")
        p, t = pred.bool(), target.bool()
        self.intersection += (p & t).sum(dim=(0, 2, 3)).cpu()
        self.union += (p | t).sum(dim=(0, 2, 3)).cpu()

    def merge(self, other: "MapIoU") -> "MapIoU":
        self.intersection += other.intersection
        self.union += other.union
        return self

    def sync(self, group=None) -> "MapIoU":
        """Sum the counts of every process (torch.distributed); a no-op when not distributed."""
        self.intersection = all_reduce_sum(self.intersection, group)
        self.union = all_reduce_sum(self.union, group)
        return self

    def compute(self) -> dict:
        """{class: IoU (NaN for an empty class)} and ``mIoU``, the mean over the non-empty classes."""
        out = {}
        for c, i, u in zip(self.classes, self.intersection.tolist(), self.union.tolist()):
            out[c] = i / u if u > 0 else math.nan
        valid = [v for v in out.values() if not math.isnan(v)]
        out["mIoU"] = sum(valid) / len(valid) if valid else math.nan
        return out
