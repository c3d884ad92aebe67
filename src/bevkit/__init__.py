"""bevkit: bird's-eye-view perception from surround cameras and LiDAR on nuScenes-format data."""

__version__ = "0.1.0"
