"""A multimodal trajectory forecaster: an agent's past plus the BEV features around it -> K futures.

Plain ``nn.Module``. The BEV map of the agent's sample is sampled on a patch of points laid out in
the agent's frame (ahead of it and to both sides), so the decoder sees the scene as the agent does.
With ``bev_channels=0`` it is the history-only baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevkit.forecast.tracks import AGENT_CLASSES, FUTURE, HISTORY


def patch_points(pose: Tensor, extent: tuple[float, float, float, float], cells: tuple[int, int]) -> Tensor:
    """Ego-frame positions of a patch of points in each agent's frame.

    ``extent`` = (behind, ahead, right, left) in metres along the agent's x and y; ``cells`` = (rows
    along y, columns along x); points are cell centres.

    Shapes:
        pose: (A, 3) agent (x, y, yaw) in ego   returns: (A, rows, cols, 2) ego x, y
    """
    back, ahead, right, left = extent
    rows, cols = cells
    xs = back + (torch.arange(cols, device=pose.device, dtype=pose.dtype) + 0.5) * (ahead - back) / cols
    ys = right + (torch.arange(rows, device=pose.device, dtype=pose.dtype) + 0.5) * (left - right) / rows
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (rows, cols)
    c, s = pose[:, 2].cos().view(-1, 1, 1), pose[:, 2].sin().view(-1, 1, 1)
    ex = pose[:, 0].view(-1, 1, 1) + c * gx - s * gy
    ey = pose[:, 1].view(-1, 1, 1) + s * gx + c * gy
    return torch.stack([ex, ey], dim=-1)


def sample_bev(bev: Tensor, agent_sample: Tensor, points: Tensor, bounds: tuple[float, float, float, float]) -> Tensor:
    """Bilinear samples of each agent's BEV map at ego-frame points (zero outside the grid).

    ``bounds`` = (xmin, xmax, ymin, ymax) of the grid; cell (iy, ix) centred at xmin + (ix + 0.5) dx.

    Shapes:
        bev: (B, C, Y, X)   agent_sample: (A,) index into B   points: (A, R, Q, 2)   returns: (A, C, R, Q)
    """
    xmin, xmax, ymin, ymax = bounds
    norm = torch.stack([(points[..., 0] - xmin) / (xmax - xmin) * 2 - 1,
                        (points[..., 1] - ymin) / (ymax - ymin) * 2 - 1], dim=-1).to(bev.dtype)
    out = bev.new_zeros(points.shape[0], bev.shape[1], *points.shape[1:3])
    for b in torch.unique(agent_sample).tolist():  # one grid_sample per sample map, all its agents at once
        sel = (agent_sample == b).nonzero().squeeze(1)
        g = norm[sel].reshape(1, -1, points.shape[2], 2)  # (1, A_b * R, Q, 2)
        v = F.grid_sample(bev[b: b + 1], g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[sel] = v.view(bev.shape[1], len(sel), points.shape[1], points.shape[2]).transpose(0, 1)
    return out


class Forecaster(nn.Module):
    """Past trajectory (``history`` + 1 points) and a BEV patch -> ``modes`` futures of ``future`` points
    and their scores.

    Frames: inputs and outputs in the agent frame (see ``bevkit.forecast.tracks``).
    """

    def __init__(self, modes: int = 10, bev_channels: int = 0, bounds=(-51.2, 51.2, -51.2, 51.2),
                 extent=(-10.0, 40.0, -20.0, 20.0), cells=(16, 20), hidden: int = 128, history: int = HISTORY,
                 future: int = FUTURE, dropout: float = 0.3, pool: int = 3):
        super().__init__()
        self.modes = modes
        self.history_len = history
        self.hidden = hidden
        self.dropout = dropout
        self.pool = pool
        self.future = future
        self.bev_channels = bev_channels
        self.bounds = tuple(bounds)
        self.extent = tuple(extent)
        self.cells = tuple(cells)
        self.history = nn.Sequential(nn.Linear((history + 1) * 3 + 1, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU())
        self.label = nn.Embedding(len(AGENT_CLASSES), hidden)
        width = 2 * hidden
        if bev_channels:
            self.patch = nn.Sequential(
                nn.Conv2d(bev_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Dropout(dropout))
            # The BEV branch enters through a gate that starts closed: training begins as the
            # history-only model and opens it only as far as the scene helps.
            self.gate = nn.Parameter(torch.zeros(1))
            width += hidden
        self.decoder = nn.Sequential(nn.Linear(width, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 2 * hidden),
                                     nn.ReLU(), nn.Linear(2 * hidden, modes * (future * 2 + 1)))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Shapes:
            batch: history (A, H+1, 2), history_valid (A, H+1), label (A,), and for the BEV variant
                   bev (B, C, Y, X), agent_sample (A,), pose (A, 3)
            returns: {"trajectories": (A, K, F, 2) agent frame, "logits": (A, K)}
        """
        hist, valid = batch["history"], batch["history_valid"].to(batch["history"].dtype)
        # velocity of the last step is the strongest cue; give the MLP positions, mask and speed
        speed = (hist[:, -1] - hist[:, -2]).norm(dim=-1, keepdim=True) * valid[:, -2:-1]
        x = torch.cat([hist.flatten(1), valid, speed], dim=1)
        parts = [self.history(x), self.label(batch["label"])]
        if self.bev_channels:
            pts = patch_points(batch["pose"], self.extent, self.cells)
            bev = batch["bev"].float()
            if self.pool > 1:  # average first, so that sparse patch points do not alias the fine map
                bev = F.avg_pool2d(bev, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
            feats = sample_bev(bev, batch["agent_sample"], pts, self.bounds)
            if "mirror" in batch:  # agents mirrored about their x axis (training augmentation)
                feats = torch.where(batch["mirror"].view(-1, 1, 1, 1), feats.flip(2), feats)
            parts.append(self.gate * self.patch(feats))
        f = self.future
        out = self.decoder(torch.cat(parts, dim=1)).view(-1, self.modes, f * 2 + 1)
        traj = out[..., : f * 2].view(-1, self.modes, f, 2).cumsum(dim=2)  # steps -> positions
        return {"trajectories": traj, "logits": out[..., -1]}

    def loss(self, out: dict[str, Tensor], future: Tensor) -> dict[str, Tensor]:
        """Winner-takes-all: smooth L1 of the mode nearest the truth (mean displacement) plus the
        cross-entropy that teaches the scores to pick it.

        Shapes:
            future: (A, F, 2)   returns: {"reg": (), "cls": (), "loss": ()}
        """
        traj = out["trajectories"]
        ade = (traj - future.unsqueeze(1)).norm(dim=-1).mean(-1)  # (A, K)
        best = ade.argmin(dim=1)
        chosen = traj[torch.arange(len(traj), device=traj.device), best]
        reg = F.smooth_l1_loss(chosen, future)
        cls = F.cross_entropy(out["logits"], best)
        return {"reg": reg, "cls": cls, "loss": reg + cls}


@torch.no_grad()
def displacement_metrics(out: dict[str, Tensor], future: Tensor, ks=(1, 5, 10), miss_threshold: float = 2.0) -> dict:
    """Sums over agents of minADE_k, minFDE_k and misses (nuScenes: the best of the top-k modes by
    score still has a point farther than ``miss_threshold`` from the truth), for each k.

    Shapes:
        future: (A, F, 2)   returns: {"count": A, "minADE_k": sum, "minFDE_k": sum, "MR_k": misses}
    """
    order = out["logits"].argsort(dim=1, descending=True)
    traj = out["trajectories"].gather(1, order.view(*order.shape, 1, 1).expand_as(out["trajectories"]))
    dist = (traj - future.unsqueeze(1)).norm(dim=-1)  # (A, K, T)
    res = {"count": len(future)}
    for k in ks:
        d = dist[:, :k]
        res[f"minADE_{k}"] = float(d.mean(-1).min(1).values.sum())
        res[f"minFDE_{k}"] = float(d[..., -1].min(1).values.sum())
        res[f"MR_{k}"] = float((d.amax(-1).min(1).values > miss_threshold).sum())
    return res
