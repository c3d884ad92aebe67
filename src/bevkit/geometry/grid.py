"""The BEV grid: one definition of cell centres, shared by targets, view transforms and plots."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BEVGrid:
    """An axis-aligned grid in the ego frame.

    BEV tensors are (B, C, Y, X) and voxels (B, C, Z, Y, X): X grows along ego forward, Y along ego
    left. Cell (iy, ix) is centred at ``(xmin + (ix + 0.5) * dx, ymin + (iy + 0.5) * dy)``; plot
    with ``origin="lower"``.
    """

    xmin: float = -51.2
    xmax: float = 51.2
    ymin: float = -51.2
    ymax: float = 51.2
    zmin: float = -5.0
    zmax: float = 3.0
    dx: float = 0.8
    dy: float = 0.8
    dz: float = 8.0

    def __post_init__(self):
        for lo, hi, step, name in ((self.xmin, self.xmax, self.dx, "x"), (self.ymin, self.ymax, self.dy, "y"),
                                   (self.zmin, self.zmax, self.dz, "z")):
            if not hi > lo:
                raise ValueError(f"BEV grid: {name}max ({hi}) must exceed {name}min ({lo})")
            if step <= 0:
                raise ValueError(f"BEV grid: d{name} must be positive, got {step}")
            n = (hi - lo) / step
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"BEV grid: the {name} range {hi - lo} is not a whole number of {step} m cells")

    @property
    def nx(self) -> int:
        return int(round((self.xmax - self.xmin) / self.dx))

    @property
    def ny(self) -> int:
        return int(round((self.ymax - self.ymin) / self.dy))

    @property
    def nz(self) -> int:
        return int(round((self.zmax - self.zmin) / self.dz))

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X)."""
        return self.ny, self.nx

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell-centre coordinates along x (X,) and y (Y,)."""
        return (self.xmin + (np.arange(self.nx) + 0.5) * self.dx, self.ymin + (np.arange(self.ny) + 0.5) * self.dy)

    def grid_from_ego(self) -> np.ndarray:
        """3x3 affine map from ego (x, y, 1) to continuous cell coordinates (ix, iy, 1); cell
        (ix, iy) spans [ix, ix + 1) so its centre is at ix + 0.5."""
        return np.array([[1 / self.dx, 0, -self.xmin / self.dx], [0, 1 / self.dy, -self.ymin / self.dy], [0, 0, 1]])

    def cell_of(self, xy: np.ndarray) -> np.ndarray:
        """Integer (ix, iy) of ego points; cells outside the grid are -1.

        Shapes:
            xy: (..., 2)   returns: (..., 2) int64
        """
        ix = np.floor((xy[..., 0] - self.xmin) / self.dx).astype(np.int64)
        iy = np.floor((xy[..., 1] - self.ymin) / self.dy).astype(np.int64)
        bad = (ix < 0) | (ix >= self.nx) | (iy < 0) | (iy >= self.ny)
        out = np.stack([ix, iy], axis=-1)
        out[bad] = -1
        return out


# Neural Map Prior / HDMapNet map segmentation: a 60 m x 30 m patch (x forward 60 m) at 0.15 m.
NMP_GRID = BEVGrid(xmin=-30.0, xmax=30.0, ymin=-15.0, ymax=15.0, zmin=-5.0, zmax=3.0, dx=0.15, dy=0.15, dz=8.0)
