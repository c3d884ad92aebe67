"""The synthetic world: a procedural city, simulated traffic, ray-cast cameras and LiDAR, written
as a complete nuScenes-format dataset (tables, images, sweeps, maps, Occ3D labels)."""

from bevkit.data.synth.writer import PRESETS, generate, plan_scenes

__all__ = ["PRESETS", "generate", "plan_scenes"]
