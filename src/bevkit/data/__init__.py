"""Data: nuScenes-format reading, the synthetic world, targets and augmentation."""
