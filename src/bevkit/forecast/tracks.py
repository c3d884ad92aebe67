"""Agents' tracks from the annotations: past and future centres in each agent's own frame.

The nuScenes prediction setting: keyframes at 2 Hz, 2 s of history (the current position and four
past ones) and 6 s of future (twelve positions). An agent is a box of a moving-capable class
(vehicles, cyclists, pedestrians) in a keyframe whose instance has a complete 6 s future in the
scene; missing history (the agent appeared less than 2 s ago) is masked.

Frames: the *agent frame* at the current keyframe has its origin at the box centre, x along the
box heading, y to its left (like ego). Targets and inputs are 2D positions in that frame; the
agent's pose in the sample's ego frame (``x, y, yaw``) places it on the sample's BEV map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, NuScenesIndex

HISTORY = 4  # past keyframes (2 s at 2 Hz) besides the current one
FUTURE = 12  # future keyframes (6 s at 2 Hz)
AGENT_CLASSES = ("car", "truck", "bus", "trailer", "construction_vehicle", "motorcycle", "bicycle", "pedestrian")


@dataclass
class AgentTracks:
    """Every agent of a split, one row each (A agents).

    Shapes (H = history, F = future keyframes):
        sample (A,) index into ``tokens``   history (A, H + 1, 2) oldest first, the last row the
        current position (0, 0)   history_valid (A, H + 1) bool   future (A, F, 2)
        pose (A, 3) agent (x, y, yaw) in the sample's ego frame   label (A,) index into AGENT_CLASSES
        speed (A,) m/s over the last 0.5 s (NaN without history)
    """

    tokens: list[str]
    sample: np.ndarray
    instance: list[str]
    history: np.ndarray
    history_valid: np.ndarray
    future: np.ndarray
    pose: np.ndarray
    label: np.ndarray
    speed: np.ndarray

    def __len__(self) -> int:
        return len(self.sample)

    def take(self, keep) -> AgentTracks:
        """The agents selected by ``keep``: an (A,) bool mask or row indices (any sequence, empty too).

        Returns tracks of the selected rows, in the order given, with the same ``tokens``."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        elif keep.size == 0:
            keep = np.zeros(0, np.int64)  # np.asarray([]) is float64, which cannot index
        return AgentTracks(self.tokens, self.sample[keep], [self.instance[i] for i in keep], self.history[keep],
                           self.history_valid[keep], self.future[keep], self.pose[keep], self.label[keep],
                           self.speed[keep])


def to_agent_frame(xy: np.ndarray, origin: np.ndarray, yaw: float) -> np.ndarray:
    """Global (or any common frame) 2D points into the frame at ``origin`` rotated by ``yaw``.

    Shapes:
        xy: (..., 2)   origin: (2,)   returns: (..., 2)
    """
    c, s = np.cos(yaw), np.sin(yaw)
    d = xy - origin
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def build_tracks(index: NuScenesIndex, split: str, class_map: dict | None = None, history: int = HISTORY,
                 future: int = FUTURE) -> AgentTracks:
    """The agents of ``split`` with a complete future, from the index's annotations (see module doc).

    ``history`` past and ``future`` coming keyframes (defaults: the nuScenes prediction setting)."""
    class_map = class_map or CATEGORY_TO_CLASS
    samples = index.split(split)
    tokens = [s["token"] for s in samples]
    rows = dict(sample=[], instance=[], history=[], valid=[], future=[], pose=[], label=[], speed=[])
    by_scene: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_scene.setdefault(s["scene_token"], []).append(i)
    for ids in by_scene.values():
        ids.sort(key=lambda i: samples[i]["timestamp"])
        # instance -> {position in scene: (global xy, global yaw, ego box)}
        where: dict[str, dict[int, tuple]] = {}
        for t, i in enumerate(ids):
            s = samples[i]
            g = np.array(s["global_from_ego"])
            a = s["anns"]
            for inst, cat, box in zip(a["instance"], a["category"], a["boxes"]):
                cls = class_map.get(cat)
                if cls not in AGENT_CLASSES:
                    continue
                xy = g[:2, :2] @ np.array(box[:2]) + g[:2, 3]
                yaw = box[6] + np.arctan2(g[1, 0], g[0, 0])
                where.setdefault(inst, {})[t] = (xy, yaw, box, AGENT_CLASSES.index(cls))
        for inst, steps in where.items():
            for t, (xy, yaw, box, label) in steps.items():
                fut = [steps.get(t + k) for k in range(1, future + 1)]
                if any(f is None for f in fut):
                    continue  # the nuScenes prediction challenge requires the full 6 s future
                past = [steps.get(t - k) for k in range(history, 0, -1)]
                hist = np.array([p[0] if p is not None else xy for p in past] + [xy])
                valid = np.array([p is not None for p in past] + [True])
                rows["sample"].append(ids[t])
                rows["instance"].append(inst)
                rows["history"].append(to_agent_frame(hist, xy, yaw) * valid[:, None])
                rows["valid"].append(valid)
                rows["future"].append(to_agent_frame(np.array([f[0] for f in fut]), xy, yaw))
                rows["pose"].append((box[0], box[1], box[6]))
                rows["label"].append(label)
                prev = steps.get(t - 1)
                rows["speed"].append(np.linalg.norm(xy - prev[0]) / 0.5 if prev is not None else np.nan)
    n = len(rows["sample"])
    return AgentTracks(
        tokens=tokens, sample=np.array(rows["sample"], np.int64), instance=rows["instance"],
        history=np.array(rows["history"], np.float32).reshape(n, history + 1, 2),
        history_valid=np.array(rows["valid"], bool).reshape(n, history + 1),
        future=np.array(rows["future"], np.float32).reshape(n, future, 2),
        pose=np.array(rows["pose"], np.float32).reshape(n, 3), label=np.array(rows["label"], np.int64),
        speed=np.array(rows["speed"], np.float32))


def turning(tracks: AgentTracks, degrees: float = 30.0) -> np.ndarray:
    """Agents whose heading over the future turns by more than ``degrees`` (intersections).

    The final heading is that of the last future displacement (agent frame). Shapes: returns (A,) bool.
    """
    k = min(3, tracks.future.shape[1])  # the last two steps (fewer with a shorter horizon)
    d = tracks.future[:, -1] - tracks.future[:, -k]
    moving = np.linalg.norm(d, axis=1) > 0.5
    heading = np.degrees(np.abs(np.arctan2(d[:, 1], d[:, 0])))
    return moving & (heading > degrees)
