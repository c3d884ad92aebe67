"""Planar paths made of straight lines and circular arcs, evaluated by arc length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """A straight line (``radius == inf``) or a circular arc starting at ``(x, y)`` with heading ``h``.

    ``turn`` is +1 for a left (counter-clockwise) arc, -1 for a right one, 0 for a line.
    """

    x: float
    y: float
    h: float
    length: float
    turn: int = 0
    radius: float = float("inf")

    def end(self) -> tuple[float, float, float]:
        x, y, h = self.at(np.array([self.length]))
        return float(x[0]), float(y[0]), float(h[0])

    def at(self, s: np.ndarray):
        """Position and heading at arc lengths ``s`` (clipped to the piece).

        Shapes:
            s: (K,)   returns: x, y, heading each (K,)
        """
        s = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        if self.turn == 0:
            return self.x + s * np.cos(self.h), self.y + s * np.sin(self.h), np.full_like(s, self.h)
        r, k = self.radius, self.turn
        cx = self.x - k * r * np.sin(self.h)
        cy = self.y + k * r * np.cos(self.h)
        theta = self.h + k * s / r
        return cx + k * r * np.sin(theta), cy - k * r * np.cos(theta), theta


class Path:
    """A chain of pieces; ``at(s)`` evaluates many arc lengths at once (clamped to the ends)."""

    def __init__(self, pieces: list[Piece]):
        if not pieces:
            raise ValueError("a path needs at least one piece")
        self.pieces = list(pieces)
        self.starts = np.concatenate([[0.0], np.cumsum([p.length for p in self.pieces])])
        self.length = float(self.starts[-1])

    def at(self, s):
        """Position, heading and curvature at arc lengths ``s``.

        Shapes:
            s: (K,)   returns: x, y, heading, curvature each (K,)
        """
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        idx = np.clip(np.searchsorted(self.starts, s, side="right") - 1, 0, len(self.pieces) - 1)
        x = np.empty_like(s)
        y = np.empty_like(s)
        h = np.empty_like(s)
        kappa = np.zeros_like(s)
        for i in np.unique(idx):
            m = idx == i
            p = self.pieces[i]
            x[m], y[m], h[m] = p.at(s[m] - self.starts[i])
            kappa[m] = p.turn / p.radius if p.turn else 0.0
        return x, y, h, kappa


def turn_pieces(x0, y0, h0, x1, y1, h1) -> list[Piece]:
    """Pieces from pose 0 to pose 1 where the headings differ by +-90 degrees or 0.

    A turn is a straight run then a quarter arc (or the arc then a straight run), the arc as wide
    as the corner allows; equal headings give one straight line.
    """
    dh = (h1 - h0 + np.pi) % (2 * np.pi) - np.pi
    if abs(dh) < 1e-6:
        return [Piece(x0, y0, h0, float(np.hypot(x1 - x0, y1 - y0)))]
    turn = 1 if dh > 0 else -1
    # The corner: where the line through pose 0 meets the line through pose 1.
    d0 = np.array([np.cos(h0), np.sin(h0)])
    d1 = np.array([np.cos(h1), np.sin(h1)])
    # corner = pose0 + run_in * d0 = pose1 - run_out * d1
    a = np.array([d0, d1]).T
    t = np.linalg.solve(a, np.array([x1 - x0, y1 - y0]))
    run_in, run_out = float(t[0]), float(t[1])
    if run_in <= 0 or run_out <= 0:
        raise ValueError(f"no forward turn joins ({x0:.2f}, {y0:.2f}, {h0:.3f}) to ({x1:.2f}, {y1:.2f}, {h1:.3f})")
    r = min(run_in, run_out)
    pieces = []
    if run_in - r > 1e-6:
        pieces.append(Piece(x0, y0, h0, run_in - r))
    sx, sy = x0 + (run_in - r) * d0[0], y0 + (run_in - r) * d0[1]
    arc = Piece(sx, sy, h0, r * abs(dh), turn, r)
    pieces.append(arc)
    if run_out - r > 1e-6:
        ex, ey, eh = arc.end()
        pieces.append(Piece(ex, ey, eh, run_out - r))
    return pieces
