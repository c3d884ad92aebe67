"""Occ3D-nuScenes semantic occupancy mIoU, from a confusion matrix.

As Occ3D's ``Metric_mIoU``: voxels outside the camera mask (``mask_camera``) are ignored, the 18 x 18
confusion matrix over classes 0-17 (17 = free) is summed over the dataset, per-class IoU =
TP / (TP + FP + FN) = diag / (row + column - diag), and mIoU is the mean over classes 0-16 (free is
not scored, but free voxels predicted as a class are that class's false positives). A class with no
GT and no prediction gives 0 / 0 = NaN and is left out of the mean: Occ3D's own code does the same
(numpy's 0/0 then ``np.nanmean``), so the figures agree.
"""

from __future__ import annotations

import math

import torch

from bevkit.eval.distributed import all_reduce_sum

OCC_CLASSES = ("others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
               "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
               "manmade", "vegetation", "free")
FREE = 17


class OccupancyMIoU:
    """Streaming confusion matrix (rows = GT, columns = prediction); ``merge`` and ``sync`` are exact."""

    def __init__(self, num_classes: int = len(OCC_CLASSES), scored: int = FREE):
        self.num_classes = num_classes
        self.scored = scored
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask_camera: torch.Tensor | None = None) -> None:
        """Add a batch of voxel labels.

        Shapes:
            pred, target: (B, X, Y, Z) int labels   mask_camera: (B, X, Y, Z) bool or None (all voxels)
        GT labels outside 0..17 (e.g. 255) are ignored, as in Occ3D; predictions must be in 0..17.
        """
        if pred.shape != target.shape or (mask_camera is not None and mask_camera.shape != target.shape):
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask_camera "
                             f"{None if mask_camera is None else tuple(mask_camera.shape)} must have one shape")
        n = self.num_classes
        gt, pr = target.long(), pred.long()
        keep = (gt >= 0) & (gt < n)
        if mask_camera is not None:
            keep &= mask_camera.bool()
        gt, pr = gt[keep], pr[keep]
        if pr.numel() and (pr.min() < 0 or pr.max() >= n):
            raise ValueError(f"predicted labels must be in 0..{n - 1}, got {int(pr.min())}..{int(pr.max())}")
        self.confusion += torch.bincount(gt * n + pr, minlength=n * n).view(n, n).cpu()

    def merge(self, other: "OccupancyMIoU") -> "OccupancyMIoU":
        self.confusion += other.confusion
        return self

    def sync(self, group=None) -> "OccupancyMIoU":
        self.confusion = all_reduce_sum(self.confusion, group)
        return self

    def compute(self) -> dict:
        """{class: IoU} for classes 0-16 (NaN where empty) and ``mIoU``, their NaN-excluding mean."""
        cm = self.confusion
        tp = cm.diag()
        denom = cm.sum(0) + cm.sum(1) - tp
        out = {}
        for c in range(self.scored):
            out[OCC_CLASSES[c] if self.num_classes == len(OCC_CLASSES) else str(c)] = \
                tp[c].item() / denom[c].item() if denom[c] > 0 else math.nan
        valid = [v for v in out.values() if not math.isnan(v)]
        out["mIoU"] = sum(valid) / len(valid) if valid else math.nan
        return out
