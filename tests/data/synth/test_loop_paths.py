"""Walkers' loops around a block: any start along an edge, including just before a corner."""

import numpy as np
import pytest

from bevkit.data.synth.agents import _loop_path


@pytest.mark.parametrize("start_frac", [0.0, 0.5, 0.93, 0.999, 1.0])
@pytest.mark.parametrize("direction", [-1, 1])
def test_a_loop_starting_near_a_corner_still_turns_forward(start_frac, direction):
    corners = np.array([[0.0, 0.0], [14.0, 0.0], [14.0, 9.0], [0.0, 9.0]])
    path = _loop_path(corners, 1, start_frac, direction, 60.0)
    s = np.linspace(0.0, path.length, 2000)
    x, y, _, _ = path.at(s)
    steps = np.hypot(np.diff(x), np.diff(y))
    assert path.length >= 60.0
    assert steps.max() < 2 * path.length / 1999 + 1e-6  # continuous: no jump between pieces
    # the walk stays on the rectangle's outline (within the 1 m corner radius)
    on_edge = np.minimum.reduce([np.abs(x), np.abs(x - 14.0), np.abs(y), np.abs(y - 9.0)])
    assert on_edge.max() < 0.3
