import numpy as np
import pytest

from bevkit.data.synth.paths import Path, Piece, turn_pieces


@pytest.mark.parametrize("end", [(10.0, 6.0, np.pi / 2), (4.0, -9.0, -np.pi / 2), (12.0, 0.0, 0.0)])
def test_turn_joins_the_two_poses_smoothly(end):
    path = Path(turn_pieces(0.0, 0.0, 0.0, *end))
    s = np.linspace(0, path.length, 400)
    x, y, h, _ = path.at(s)
    np.testing.assert_allclose([x[-1], y[-1], h[-1]], end, atol=1e-9)
    step = np.hypot(np.diff(x), np.diff(y))
    np.testing.assert_allclose(step, path.length / 399, rtol=1e-5)  # unit speed (chords of the arc): no jumps
    assert np.abs(np.diff(h)).max() < 0.05


def test_turn_behind_is_refused():
    with pytest.raises(ValueError):
        turn_pieces(0.0, 0.0, 0.0, -5.0, 5.0, np.pi / 2)


def test_arc_geometry_by_hand():
    quarter = Piece(0.0, 0.0, 0.0, np.pi / 2 * 3.0, turn=1, radius=3.0)
    x, y, h = quarter.at(np.array([quarter.length]))
    np.testing.assert_allclose([x[0], y[0], h[0]], [3.0, 3.0, np.pi / 2], atol=1e-12)
    right = Piece(0.0, 0.0, 0.0, np.pi / 2 * 2.0, turn=-1, radius=2.0)
    x, y, h = right.at(np.array([right.length]))
    np.testing.assert_allclose([x[0], y[0], h[0]], [2.0, -2.0, -np.pi / 2], atol=1e-12)
