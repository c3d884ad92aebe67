"""HD-map targets from nuScenes map-expansion JSON, rasterised in the ego frame of a sample.

Read with shapely 2 directly (the devkit's map API is tied to the four real cities). Classes as
HDMapNet / Neural Map Prior: ``divider`` (road and lane dividers), ``ped_crossing`` (crossing
outlines), ``boundary`` (the outline of road segments and lanes), all drawn as lines of fixed
width, plus ``drivable`` (filled drivable area).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry import LineString, MultiLineString, Polygon, box
from shapely.ops import unary_union

from bevkit.geometry.grid import BEVGrid

MAP_CLASSES = ("divider", "ped_crossing", "boundary", "drivable")


class MapLayers:
    """The map of one location as shapely geometries in the global frame, with a spatial index."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            m = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot read the map expansion ({e})") from None
        nodes = {n["token"]: (n["x"], n["y"]) for n in m["node"]}
        polys = {p["token"]: p for p in m["polygon"]}
        lines = {ln["token"]: ln for ln in m["line"]}

        def polygon(token):
            p = polys[token]
            holes = [[nodes[t] for t in h["node_tokens"]] for h in p["holes"] if h["node_tokens"]]
            return Polygon([nodes[t] for t in p["exterior_node_tokens"]], holes)

        def line(token):
            return LineString([nodes[t] for t in lines[token]["node_tokens"]])

        def valid(polygons: list) -> list:
            # As the devkit's map API reads its layers: an invalid (self-intersecting) polygon is left
            # out; real map expansions hold a few, and the union and clipping below would fail on them.
            kept = [p for p in polygons if p.is_valid]
            self.invalid_polygons += len(polygons) - len(kept)
            return kept

        self.invalid_polygons = 0
        dividers = [line(r["line_token"]) for r in m.get("road_divider", []) + m.get("lane_divider", [])]
        crossings = [polygon(r["polygon_token"]).exterior for r in m.get("ped_crossing", [])]
        road = unary_union(valid([polygon(r["polygon_token"]) for r in m.get("road_segment", []) + m.get("lane", [])]))
        boundary = _outlines(road)
        drivable = valid([polygon(t) for r in m.get("drivable_area", []) for t in r["polygon_tokens"]])
        self.geoms = {
            "divider": [g for g in dividers if not g.is_empty],
            "ped_crossing": [LineString(g.coords) for g in crossings],
            "boundary": boundary,
            "drivable": drivable,
        }
        self.trees = {k: shapely.STRtree(v) if v else None for k, v in self.geoms.items()}

    def query(self, name: str, region: Polygon) -> list:
        tree = self.trees[name]
        if tree is None:
            return []
        return [self.geoms[name][i] for i in tree.query(region)]


def _outlines(geom) -> list:
    parts = [geom] if geom.geom_type == "Polygon" else list(getattr(geom, "geoms", []))
    out = []
    for p in parts:
        out.append(LineString(p.exterior.coords))
        out.extend(LineString(h.coords) for h in p.interiors)
    return out


def rasterise(layers: MapLayers, ego_from_global: np.ndarray, grid: BEVGrid, line_width: float = 0.6,
              classes=MAP_CLASSES) -> np.ndarray:
    """Map classes on a BEV grid, in the frame given by ``ego_from_global`` (any 4x4 with no
    out-of-plane rotation, e.g. including a BEV augmentation).

    Lines are drawn ``line_width`` metres wide (at least one cell); ``drivable`` is filled.

    Shapes:
        ego_from_global: (4, 4)   returns: (K, Y, X) uint8 in {0, 1}
    """
    global_from_ego = np.linalg.inv(ego_from_global)
    # The grid's footprint in the global frame, to query the spatial index.
    corners = np.array([[grid.xmin, grid.ymin], [grid.xmax, grid.ymin], [grid.xmax, grid.ymax], [grid.xmin, grid.ymax]])
    g = corners @ global_from_ego[:2, :2].T + global_from_ego[:2, 3]
    region = Polygon(g)
    # ego (x, y) -> drawing coordinates (column, row) with cell centres at integers.
    a = ego_from_global[:2, :2]
    b = ego_from_global[:2, 3]
    scale = np.array([1 / grid.dx, 1 / grid.dy])
    offset = -np.array([grid.xmin / grid.dx, grid.ymin / grid.dy]) - 0.5

    def to_px(coords):
        xy = np.asarray(coords)[:, :2] @ a.T + b
        return [tuple(p) for p in xy * scale + offset]

    width_px = max(1, int(round(line_width / min(grid.dx, grid.dy))))
    out = np.zeros((len(classes), grid.ny, grid.nx), np.uint8)
    clip = box(*region.bounds).buffer(line_width)
    for k, name in enumerate(classes):
        img = Image.new("L", (grid.nx, grid.ny), 0)
        draw = ImageDraw.Draw(img)
        for geom in layers.query(name, region):
            geom = geom.intersection(clip)
            if geom.is_empty:
                continue
            if name == "drivable":
                for p in ([geom] if geom.geom_type == "Polygon" else
                          [x for x in getattr(geom, "geoms", []) if x.geom_type == "Polygon"]):
                    if not p.interiors:
                        draw.polygon(to_px(p.exterior.coords), fill=1)
                        continue
                    # A polygon with holes on its own canvas, then added: its holes must not erase
                    # another drivable polygon drawn before it.
                    own = Image.new("L", (grid.nx, grid.ny), 0)
                    own_draw = ImageDraw.Draw(own)
                    own_draw.polygon(to_px(p.exterior.coords), fill=255)  # a mask: 255 is opaque
                    for h in p.interiors:
                        own_draw.polygon(to_px(h.coords), fill=0)
                    img.paste(1, mask=own)
            else:
                for ln in ([geom] if geom.geom_type == "LineString" else
                           [x for x in getattr(geom, "geoms", []) if x.geom_type == "LineString"]
                           if isinstance(geom, MultiLineString) or hasattr(geom, "geoms") else []):
                    pts = to_px(ln.coords)
                    if len(pts) >= 2:
                        draw.line(pts, fill=1, width=width_px, joint="curve")
        out[k] = np.asarray(img, np.uint8)
    return out
