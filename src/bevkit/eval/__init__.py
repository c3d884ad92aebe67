"""Official-metric evaluation: nuScenes detection (mAP, NDS, TP errors), HD-map IoU, Occ3D mIoU."""

from bevkit.eval.results import ResultsError

__all__ = ["ResultsError"]
