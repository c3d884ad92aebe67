"""Neural Map Prior: a global map memory of BEV features per location, and the module that fuses
it with the current BEV and computes the update written back.

The memory (:class:`MapPriorMemory`) is plain state, never a module attribute: the caller reads the
prior for a batch, passes it to the model with the batch, and writes the model's update back, so
the model itself stores nothing between calls (as for temporal fusion).

Frames: the memory is a raster in the global frame of each location (the nuScenes map frame), cell
``(gy, gx)`` covering ``[gx c, (gx + 1) c) x [gy c, (gy + 1) c)`` metres for a cell size ``c``, stored
as square tiles allocated where a sample has written. The model's BEV is on the grid of the
(augmented) ego frame; ``global_from_bev`` maps that frame to the global one. The BEV planes are
treated as parallel to the global ground plane (only the x, y rows of the pose are used), as the
temporal warp does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from bevkit.ops import BEVGridSpec

MEMORY_SCHEMA = 1


def _xy_affine(global_from_bev: Tensor) -> tuple[Tensor, Tensor]:
    """The x, y part of a pose: ``g = A @ (x, y) + t`` for points on the BEV plane (z = 0).

    Shapes:
        global_from_bev: (4, 4)   returns: A (2, 2), t (2,) in float64
    """
    m = global_from_bev.detach().to("cpu", torch.float64)
    return m[:2, :2], m[:2, 3]


class MapPriorMemory:
    """A global map of ``channels`` feature channels per location, at ``cell`` metres per cell, in
    square tiles of ``tile`` x ``tile`` cells allocated on first write.

    Each tile holds the features and one more channel, the observed weight (1 where a sample has
    written, 0 elsewhere). Tiles live on ``device`` in ``dtype`` (float16 halves the memory of a
    city-sized map); reads return float32 on the device of the request.
    """

    def __init__(self, channels: int, cell: float, tile: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if channels < 1 or cell <= 0 or tile < 1:
            raise ValueError(f"map prior memory: channels {channels}, cell {cell} and tile {tile} must be positive")
        self.channels, self.cell, self.tile = int(channels), float(cell), int(tile)
        self.dtype, self.device = dtype, torch.device(device)
        self.tiles: dict[tuple[str, int, int], Tensor] = {}

    # ---- geometry ----------------------------------------------------------------------------------

    def _patch_cells(self, global_from_bev: Tensor, grid: BEVGridSpec) -> tuple[int, int, int, int]:
        """Global cells ``[gx0, gx1) x [gy0, gy1)`` covering the BEV patch, with a margin of one cell."""
        a, t = _xy_affine(global_from_bev)
        (x0, x1, _), (y0, y1, _) = grid.xbound, grid.ybound
        corners = torch.tensor([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=torch.float64)
        g = corners @ a.T + t
        lo = torch.floor(g.min(0).values / self.cell).long() - 1
        hi = torch.floor(g.max(0).values / self.cell).long() + 2
        return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])

    def _crop(self, location: str, gx0: int, gy0: int, gx1: int, gy1: int) -> Tensor:
        """The cells ``[gx0, gx1) x [gy0, gy1)`` of a location as one (C + 1, H, W) tensor (zeros where
        no tile exists)."""
        t = self.tile
        out = torch.zeros(self.channels + 1, gy1 - gy0, gx1 - gx0, dtype=self.dtype, device=self.device)
        for ty in range(gy0 // t, (gy1 - 1) // t + 1):
            for tx in range(gx0 // t, (gx1 - 1) // t + 1):
                tile = self.tiles.get((location, ty, tx))
                if tile is None:
                    continue
                ys, xs = max(gy0, ty * t), max(gx0, tx * t)
                ye, xe = min(gy1, (ty + 1) * t), min(gx1, (tx + 1) * t)
                out[:, ys - gy0:ye - gy0, xs - gx0:xe - gx0] = tile[:, ys - ty * t:ye - ty * t, xs - tx * t:xe - tx * t]
        return out

    def _store(self, location: str, gx0: int, gy0: int, crop: Tensor, touched: Tensor) -> None:
        """Write a crop back into its tiles, allocating the tiles that receive a written cell.

        Shapes:
            crop: (C + 1, H, W)   touched: (H, W) bool, the cells written
        """
        t = self.tile
        gy1, gx1 = gy0 + crop.shape[1], gx0 + crop.shape[2]
        for ty in range(gy0 // t, (gy1 - 1) // t + 1):
            for tx in range(gx0 // t, (gx1 - 1) // t + 1):
                ys, xs = max(gy0, ty * t), max(gx0, tx * t)
                ye, xe = min(gy1, (ty + 1) * t), min(gx1, (tx + 1) * t)
                key = (location, ty, tx)
                if key not in self.tiles:
                    if not bool(touched[ys - gy0:ye - gy0, xs - gx0:xe - gx0].any()):
                        continue
                    self.tiles[key] = torch.zeros(self.channels + 1, t, t, dtype=self.dtype, device=self.device)
                self.tiles[key][:, ys - ty * t:ye - ty * t, xs - tx * t:xe - tx * t] = \
                    crop[:, ys - gy0:ye - gy0, xs - gx0:xe - gx0]

    # ---- read and write ----------------------------------------------------------------------------

    @torch.no_grad()
    def read(self, locations: list[str], global_from_bev: Tensor, grid: BEVGridSpec,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """The prior on each sample's BEV grid: the global map sampled bilinearly at every cell centre,
        averaged over the observed neighbours only (normalised by the observed weight).

        Frames: ``global_from_bev[b]`` maps sample b's BEV frame (the augmented ego frame) to the global
        frame of ``locations[b]``; the result is on ``grid`` in that BEV frame.

        Shapes:
            global_from_bev: (B, 4, 4)
            returns: prior (B, C, Y, X) float32 (zero where unobserved), observed (B, 1, Y, X) in [0, 1]
        """
        (x0, x1, dx), (y0, y1, dy) = grid.xbound, grid.ybound
        nx, ny = round((x1 - x0) / dx), round((y1 - y0) / dy)
        xs = x0 + (torch.arange(nx, dtype=torch.float64) + 0.5) * dx
        ys = y0 + (torch.arange(ny, dtype=torch.float64) + 0.5) * dy
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cells = torch.stack([cx, cy], -1)  # (Y, X, 2) metres in the BEV frame
        out = []
        for b, loc in enumerate(locations):
            gx0, gy0, gx1, gy1 = self._patch_cells(global_from_bev[b], grid)
            crop = self._crop(loc, gx0, gy0, gx1, gy1).float()
            a, t = _xy_affine(global_from_bev[b])
            g = cells @ a.T + t - torch.tensor([gx0, gy0], dtype=torch.float64) * self.cell  # relative to crop
            size = torch.tensor([gx1 - gx0, gy1 - gy0], dtype=torch.float64) * self.cell
            norm = (2 * g / size - 1).to(crop.dtype).to(crop.device)
            out.append(F.grid_sample(crop[None], norm[None], mode="bilinear", padding_mode="zeros",
                                     align_corners=False)[0])
        dev = torch.device(device) if device is not None else self.device
        if not out:
            return (torch.zeros(0, self.channels, ny, nx, device=dev), torch.zeros(0, 1, ny, nx, device=dev))
        sampled = torch.stack(out).to(dev)  # (B, C + 1, Y, X)
        observed = sampled[:, -1:].clamp(0, 1)
        prior = torch.where(observed > 1e-6, sampled[:, :-1] / observed.clamp_min(1e-6), torch.zeros_like(sampled[:, :-1]))
        return prior, observed

    @torch.no_grad()
    def write(self, locations: list[str], global_from_bev: Tensor, grid: BEVGridSpec, update: Tensor) -> int:
        """Replace the global map under each sample's BEV patch with ``update`` (the map-prior module's
        output, which already blends the old prior with the current frame), in batch order.

        Every global cell whose centre falls inside the patch (bilinear coverage above one half) takes
        the update resampled there and becomes observed; cells outside keep their values.

        Shapes:
            global_from_bev: (B, 4, 4)   update: (B, C, Y, X) on ``grid``
            returns: the number of global cells written
        """
        if update.shape[1] != self.channels:
            raise ValueError(f"map prior memory holds {self.channels} channels, the update has {update.shape[1]}")
        (x0, x1, _), (y0, y1, _) = grid.xbound, grid.ybound
        written = 0
        for b, loc in enumerate(locations):
            gx0, gy0, gx1, gy1 = self._patch_cells(global_from_bev[b], grid)
            crop = self._crop(loc, gx0, gy0, gx1, gy1)
            a, t = _xy_affine(global_from_bev[b])
            gxs = (gx0 + torch.arange(gx1 - gx0, dtype=torch.float64) + 0.5) * self.cell
            gys = (gy0 + torch.arange(gy1 - gy0, dtype=torch.float64) + 0.5) * self.cell
            cy, cx = torch.meshgrid(gys, gxs, indexing="ij")
            local = (torch.stack([cx, cy], -1) - t) @ torch.linalg.inv(a).T  # (H, W, 2) metres, BEV frame
            norm = torch.stack([2 * (local[..., 0] - x0) / (x1 - x0) - 1, 2 * (local[..., 1] - y0) / (y1 - y0) - 1], -1)
            src = update[b].detach().float()
            src = torch.cat([src, torch.ones_like(src[:1])])  # coverage channel
            res = F.grid_sample(src[None], norm[None].to(src), mode="bilinear", padding_mode="zeros",
                                align_corners=False)[0].to(self.device)
            cover = res[-1]
            touched = cover > 0.5
            values = res[:-1] / cover.clamp_min(1e-6)
            crop[:-1] = torch.where(touched, values, crop[:-1].float()).to(self.dtype)
            crop[-1] = torch.where(touched, torch.ones_like(cover), crop[-1].float()).to(self.dtype)
            self._store(loc, gx0, gy0, crop, touched)
            written += int(touched.sum())
        return written

    # ---- bookkeeping -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything (a fresh memory for another split)."""
        self.tiles.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tiles.values())

    def observed_cells(self, location: str | None = None) -> int:
        """Global cells written at least once (in one location, or in all)."""
        return int(sum(int((t[-1] > 0).sum()) for k, t in self.tiles.items() if location in (None, k[0])))

    def raster(self, location: str) -> tuple[Tensor, tuple[float, float]]:
        """Every tile of a location assembled into one raster, for inspection and plots.

        Returns:
            (C + 1, H, W) float32 (last channel: observed) and the global (x, y) in metres of its
            lower-left corner
        """
        keys = [(ty, tx) for (loc, ty, tx) in self.tiles if loc == location]
        if not keys:
            raise KeyError(f"map prior memory: nothing written for location {location!r}")
        t = self.tile
        ty0, ty1 = min(k[0] for k in keys), max(k[0] for k in keys) + 1
        tx0, tx1 = min(k[1] for k in keys), max(k[1] for k in keys) + 1
        crop = self._crop(location, tx0 * t, ty0 * t, tx1 * t, ty1 * t).float()
        return crop, (tx0 * t * self.cell, ty0 * t * self.cell)

    def save(self, path: str | Path) -> Path:
        """Write the memory to a ``.safetensors`` file atomically (never pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{loc}|{ty}|{tx}": tile.contiguous().cpu() for (loc, ty, tx), tile in self.tiles.items()}
        meta = {"bevkit": "map_prior_memory", "schema": str(MEMORY_SCHEMA), "channels": str(self.channels),
                "cell": repr(self.cell), "tile": str(self.tile), "dtype": str(self.dtype).removeprefix("torch.")}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "MapPriorMemory":
        """Read a memory written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no map prior memory file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("bevkit") != "map_prior_memory" or meta.get("schema") != str(MEMORY_SCHEMA):
                    raise ValueError(f"{path}: not a bevkit map prior memory of schema {MEMORY_SCHEMA} "
                                     f"(metadata {json.dumps(meta)})")
                dtype = getattr(torch, meta["dtype"])
                mem = cls(int(meta["channels"]), float(meta["cell"]), int(meta["tile"]), dtype, device)
                for key in f.keys():
                    loc, ty, tx = key.rsplit("|", 2)
                    tile = f.get_tensor(key)
                    if tuple(tile.shape) != (mem.channels + 1, mem.tile, mem.tile):
                        raise ValueError(f"{path}: tile {key} has shape {tuple(tile.shape)}")
                    mem.tiles[(loc, int(ty), int(tx))] = tile.to(device)
        except (OSError, KeyError, SafetensorError) as e:  # a damaged or foreign file
            raise ValueError(f"{path}: unreadable map prior memory ({e})") from None
        return mem


# ------------------------------------------------------------------------------------- the module


class ConvGRU(nn.Module):
    """A convolutional GRU cell: the hidden state is the prior, the input the current features."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.gates = nn.Conv2d(2 * channels, 2 * channels, kernel, padding=pad)
        self.candidate = nn.Conv2d(2 * channels, channels, kernel, padding=pad)

    def forward(self, hidden: Tensor, x: Tensor) -> Tensor:
        """Shapes:
            hidden, x: (B, C, Y, X)   returns: (B, C, Y, X)
        """
        z, r = torch.sigmoid(self.gates(torch.cat([hidden, x], 1))).chunk(2, 1)
        n = torch.tanh(self.candidate(torch.cat([r * hidden, x], 1)))
        return (1 - z) * hidden + z * n


def _log_relative_coords(window: int) -> Tensor:
    """Relative offsets between the cells of a window, log-spaced as Swin-V2 feeds its position MLP.

    Shapes:
        returns: ((2w - 1)^2, 2)
    """
    r = torch.arange(-(window - 1), window, dtype=torch.float32)
    d = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)  # (dy, dx)
    scale = max(window - 1, 1)
    d = d / scale * 8
    return torch.sign(d) * torch.log2(1 + d.abs()) / math.log2(8)


class WindowCrossAttention(nn.Module):
    """Current-to-prior attention (NMP's C2P): every BEV cell attends to the prior cells of its
    ``window`` x ``window`` window (non-overlapping windows; the map is zero-padded to whole windows
    and padded keys are masked). Scaled cosine attention with a learned temperature per head and a
    continuous relative-position bias from a small MLP over log-spaced offsets, as Swin-V2."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"map prior: channels {dim} must divide into {heads} heads")
        self.heads, self.window = heads, window
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.pos_mlp = nn.Sequential(nn.Linear(2, 256), nn.ReLU(inplace=True), nn.Linear(256, heads, bias=False))
        self.register_buffer("rel_coords", _log_relative_coords(window), persistent=False)
        idx = torch.arange(window)
        yy, xx = torch.meshgrid(idx, idx, indexing="ij")
        flat = torch.stack([yy.flatten(), xx.flatten()])  # (2, w*w)
        rel = flat[:, :, None] - flat[:, None, :] + (window - 1)  # (2, w*w, w*w) in [0, 2w - 2]
        self.register_buffer("rel_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def _windows(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """(B, C, Y, X) -> (B * nW, w*w, C), zero-padded to whole windows."""
        b, c, ny, nx = x.shape
        w = self.window
        py, px = (-ny) % w, (-nx) % w
        x = F.pad(x, (0, px, 0, py))
        gy, gx = (ny + py) // w, (nx + px) // w
        x = x.view(b, c, gy, w, gx, w).permute(0, 2, 4, 3, 5, 1).reshape(b * gy * gx, w * w, c)
        return x, (gy, gx, py, px)

    def forward(self, query: Tensor, prior: Tensor) -> Tensor:
        """Shapes:
            query: (B, C, Y, X) the current BEV (with its position encoding)   prior: (B, C, Y, X)
            returns: (B, C, Y, X) the attended prior features
        """
        b, c, ny, nx = query.shape
        w, h = self.window, self.heads
        q, (gy, gx, py, px) = self._windows(query)
        kv, _ = self._windows(prior)
        n = q.shape[0]
        q = self.q(q).view(n, w * w, h, c // h).transpose(1, 2)  # (nW*B, heads, w*w, Dh)
        k, v = self.kv(kv).view(n, w * w, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        bias = 16 * torch.sigmoid(self.pos_mlp(self.rel_coords))  # ((2w-1)^2, heads)
        attn = attn + bias[self.rel_index].permute(2, 0, 1).unsqueeze(0)
        if py or px:  # padded prior cells are not keys
            valid = F.pad(query.new_ones(1, 1, ny, nx), (0, px, 0, py))
            valid = valid.view(1, 1, gy, w, gx, w).permute(0, 2, 4, 3, 5, 1).reshape(gy * gx, w * w)
            mask = (valid == 0).repeat(b, 1)[:, None, None, :]  # (B*nW, 1, 1, w*w)
            attn = attn.masked_fill(mask, float("-inf"))
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n, w * w, c)
        out = self.proj(out)
        out = out.view(b, gy, gx, w, w, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gy * w, gx * w)
        return out[:, :, :ny, :nx]


class MapPriorFusion(nn.Module):
    """Neural Map Prior's fusion of the current BEV with the prior read from the global map:
    current-to-prior window attention (queries: the current BEV plus a learned position encoding;
    keys and values: the prior), a feed-forward block, then a ConvGRU whose hidden state is the prior
    and whose input is the attended current BEV. The GRU's output is the update the caller writes back
    into the memory; the decoder reads the current BEV plus a 1x1 projection of it, initialised near
    zero, so that a model started from a trained baseline (NMP's second stage) starts from the
    baseline's own input and learns how much of the prior to take.

    Where nothing has been observed the prior is zero, so the first traversal of a street is decoded
    from the current frame alone.
    """

    def __init__(self, channels: int, grid_shape: tuple[int, int], heads: int = 8, window: int = 10,
                 ffn: int = 512, kernel: int = 3):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, channels, *grid_shape))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.attn = WindowCrossAttention(channels, heads, window)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn), nn.GELU(), nn.Linear(ffn, channels))
        self.norm2 = nn.LayerNorm(channels)
        self.gru = ConvGRU(channels, kernel)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.normal_(self.out.weight, std=1e-4)
        nn.init.zeros_(self.out.bias)

    def forward(self, bev: Tensor, prior: Tensor | None) -> tuple[Tensor, Tensor]:
        """Frames: ``bev`` and ``prior`` on the same ego-frame grid.

        Shapes:
            bev: (B, C, Y, X)   prior: (B, C, Y, X) or None (nothing observed: zeros)
            returns: the decoder's input (B, C, Y, X), the memory update (B, C, Y, X)
        """
        if prior is None:
            prior = torch.zeros_like(bev)
        prior = prior.to(bev.dtype)
        q = bev + self.pos
        x = q.permute(0, 2, 3, 1) + self.norm1(self.attn(q, prior).permute(0, 2, 3, 1))  # (B, Y, X, C)
        x = x + self.norm2(self.ffn(x))  # post-norm residuals, as Swin-V2
        update = self.gru(prior, x.permute(0, 3, 1, 2))
        return bev + self.out(update), update
