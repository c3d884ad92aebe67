"""Trajectory forecasting on BEV features (cached or computed on the fly)."""

from bevkit.forecast.model import Forecaster, displacement_metrics
from bevkit.forecast.tracks import FUTURE, HISTORY, AgentTracks, build_tracks

__all__ = ["FUTURE", "HISTORY", "AgentTracks", "Forecaster", "build_tracks", "displacement_metrics"]
