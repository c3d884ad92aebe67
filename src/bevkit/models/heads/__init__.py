"""Task heads on the BEV grid; each owns ``forward``, ``loss`` and ``decode``."""

from bevkit.models.heads.detection import CenterHead
from bevkit.models.heads.detr import DETRHead
from bevkit.models.heads.map_seg import MapSegHead
from bevkit.models.heads.occupancy import OccupancyHead

__all__ = ["CenterHead", "DETRHead", "MapSegHead", "OccupancyHead"]
