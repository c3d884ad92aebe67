"""The city as a nuScenes map-expansion JSON (schema version 1.3) and the ``map`` table's mask PNG."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import LineString, Polygon, box
from shapely.ops import unary_union

from bevkit.data.synth.city import (
    CROSSWALK_DEPTH,
    CROSSWALK_GAP,
    LANE_WIDTH,
    SIDEWALK,
    City,
    _rect_along,
    _road_sections,
    _road_span,
    block_cells,
    crossings,
    marking_lines,
    road_of,
)
from bevkit.geometry import apply

MAP_VERSION = "1.3"


class _Builder:
    """Accumulates geometric (node, line, polygon) and semantic records with stable tokens."""

    def __init__(self, city: City):
        self.city = city
        self.layers = {name: [] for name in (
            "polygon", "line", "node", "drivable_area", "road_segment", "road_block", "lane", "ped_crossing",
            "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider", "traffic_light", "lane_connector")}
        self.arcline_path_3: dict = {}
        self.connectivity: dict = {}
        self._count = 0

    def token(self, kind: str) -> str:
        self._count += 1
        return hashlib.md5(f"map/{self.city.location}/{kind}/{self._count}".encode()).hexdigest()

    def to_global(self, xy) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        xyz = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
        return apply(self.city.global_from_city, xyz)[:, :2]

    def nodes(self, xy_city) -> list[str]:
        tokens = []
        for x, y in self.to_global(xy_city):
            t = self.token("node")
            self.layers["node"].append({"token": t, "x": round(float(x), 4), "y": round(float(y), 4)})
            tokens.append(t)
        return tokens

    def polygon(self, poly: Polygon) -> str:
        poly = poly.buffer(0) if not poly.is_valid else poly
        ext = list(poly.exterior.coords)[:-1]
        holes = [{"token": self.token("hole"), "node_tokens": self.nodes(list(h.coords)[:-1])} for h in poly.interiors]
        t = self.token("polygon")
        self.layers["polygon"].append({"token": t, "exterior_node_tokens": self.nodes(ext), "holes": holes})
        return t

    def line(self, xy_city) -> tuple[str, list[str]]:
        t = self.token("line")
        nodes = self.nodes(xy_city)
        self.layers["line"].append({"token": t, "node_tokens": nodes})
        return t, nodes

    def pose(self, x, y, h) -> list[float]:
        gx, gy = self.to_global([[x, y]])[0]
        yaw = h + np.arctan2(self.city.global_from_city[1, 0], self.city.global_from_city[0, 0])
        return [round(float(gx), 4), round(float(gy), 4), round(float((yaw + np.pi) % (2 * np.pi) - np.pi), 6)]

    def arcline(self, pieces) -> list[dict]:
        """Arcline paths (the devkit's three-segment words) for a chain of lines and arcs."""
        out = []
        for p in pieces:
            x1, y1, h1 = p.end()
            if p.turn == 0:
                shape, lengths, radius = "LSL", [0.0, p.length, 0.0], 999.0
            else:
                shape = "LSL" if p.turn > 0 else "RSR"
                lengths, radius = [p.length, 0.0, 0.0], p.radius
            out.append({
                "start_pose": self.pose(p.x, p.y, p.h),
                "end_pose": self.pose(x1, y1, h1),
                "shape": shape,
                "radius": round(float(radius), 4),
                "segment_length": [round(float(v), 4) for v in lengths],
            })
        return out


def build_map_json(city: City) -> dict:
    """The map-expansion JSON of a city in the global frame (nuScenes schema 1.3)."""
    b = _Builder(city)
    roads = city.ew_roads + city.ns_roads
    road_polys = []
    segment_of = {}
    # Road segments: street sections and intersections.
    for road in roads:
        for k, a, c, _, _ in _road_sections(city, road):
            poly = box(*_xyxy(_rect_along(road, a, c, -road.half_width, road.half_width)))
            road_polys.append(poly)
            t = b.token("road_segment")
            b.layers["road_segment"].append({"token": t, "polygon_token": b.polygon(poly), "is_intersection": False,
                                             "drivable_area_token": ""})
            segment_of[(road.axis, road.index, k)] = t
    for i in range(len(city.ns_roads)):
        for j in range(len(city.ew_roads)):
            poly = box(*_xyxy(city.intersection_box(i, j)))
            road_polys.append(poly)
            t = b.token("road_segment")
            b.layers["road_segment"].append({"token": t, "polygon_token": b.polygon(poly), "is_intersection": True,
                                             "drivable_area_token": ""})
    drivable = unary_union(road_polys)
    da_token = b.token("drivable_area")
    polys = [drivable] if drivable.geom_type == "Polygon" else list(drivable.geoms)
    b.layers["drivable_area"].append({"token": da_token, "polygon_tokens": [b.polygon(p) for p in polys]})
    for rec in b.layers["road_segment"]:
        rec["drivable_area_token"] = da_token

    # Road blocks (one per direction of a section) and lanes.
    side = 1.0 if city.drive_left else -1.0
    lane_tokens = {}
    for lane in city.lanes:
        lane_tokens[lane.id] = b.token("lane")
    edge_lines = {}
    for lane in city.lanes:
        road = road_of(city, lane)
        x1, y1, _ = lane.end()
        nl = np.array([-np.sin(lane.heading), np.cos(lane.heading)])
        half = LANE_WIDTH / 2
        p0, p1 = np.array([lane.x0, lane.y0]), np.array([x1, y1])
        corners = [p0 - nl * half, p1 - nl * half, p1 + nl * half, p0 + nl * half]
        from_edge, _ = b.line([p0 - nl * half, p0 + nl * half])
        to_edge, _ = b.line([p1 - nl * half, p1 + nl * half])
        edge_lines[lane.id] = (from_edge, to_edge)
        left_nodes = b.nodes([p0 + nl * half, p1 + nl * half])
        right_nodes = b.nodes([p0 - nl * half, p1 - nl * half])
        inner_type = "DOUBLE_SOLID_YELLOW" if city.divider_code == 3 else "DOUBLE_SOLID_WHITE"
        inner_is_left = side < 0  # right-hand traffic: the centre line is on the lane's left
        def seg_type(is_inner, is_outer):
            if is_inner:
                return inner_type
            if is_outer:
                return "SINGLE_SOLID_WHITE"
            return "DOUBLE_DASHED_WHITE"
        left_type = seg_type(lane.index == 0 and inner_is_left, lane.index == road.lanes - 1 and not inner_is_left)
        right_type = seg_type(lane.index == 0 and not inner_is_left, lane.index == road.lanes - 1 and inner_is_left)
        b.layers["lane"].append({
            "token": lane_tokens[lane.id],
            "polygon_token": b.polygon(Polygon(corners)),
            "lane_type": "CAR",
            "from_edge_line_token": from_edge,
            "to_edge_line_token": to_edge,
            "left_lane_divider_segments": [{"node_token": t, "segment_type": left_type} for t in left_nodes],
            "right_lane_divider_segments": [{"node_token": t, "segment_type": right_type} for t in right_nodes],
        })
        b.arcline_path_3[lane_tokens[lane.id]] = b.arcline(lane.path().pieces)
    for road in roads:
        for k, a, c, na, nb in _road_sections(city, road):
            for direction in (+1, -1):
                members = [ln for ln in city.lanes if ln.road == (road.index + (0 if road.axis == 0 else 100))
                           and ln.section == k and ln.direction == direction]
                offs = [0.0, side * road.half_width * (1 if (road.axis == 0) == (direction > 0) else -1)]
                lo, hi = min(offs), max(offs)
                poly = box(*_xyxy(_rect_along(road, a, c, lo, hi)))
                b.layers["road_block"].append({
                    "token": b.token("road_block"),
                    "polygon_token": b.polygon(poly),
                    "from_edge_line_token": edge_lines[members[0].id][0],
                    "to_edge_line_token": edge_lines[members[0].id][1],
                    "road_segment_token": segment_of[(road.axis, road.index, k)],
                })

    # Lane connectors through intersections, and connectivity.
    for lane in city.lanes:
        b.connectivity[lane_tokens[lane.id]] = {"incoming": [], "outgoing": []}
    for conn in city.connectors:
        t = b.token("lane_connector")
        pts = np.concatenate([np.stack(p.at(np.linspace(0, p.length, 8))[:2], 1) for p in conn.pieces])
        poly = LineString(pts).buffer(LANE_WIDTH / 2, cap_style="flat")
        b.layers["lane_connector"].append({"token": t, "polygon_token": b.polygon(poly)})
        b.arcline_path_3[t] = b.arcline(conn.pieces)
        t_in, t_out = lane_tokens[conn.lane_in], lane_tokens[conn.lane_out]
        b.connectivity[t] = {"incoming": [t_in], "outgoing": [t_out]}
        b.connectivity[t_in]["outgoing"].append(t)
        b.connectivity[t_out]["incoming"].append(t)

    # Painted lines.
    for road, k, a, c, off, w, code, dashed, kind in marking_lines(city):
        if road.axis == 0:
            pts = [(a, road.pos + off), (c, road.pos + off)]
        else:
            pts = [(road.pos - off, a), (road.pos - off, c)]
        line_token, nodes = b.line(pts)
        if kind == "road_divider":
            b.layers["road_divider"].append({"token": b.token("road_divider"), "line_token": line_token,
                                             "road_segment_token": segment_of[(road.axis, road.index, k)]})
        else:
            seg = "DOUBLE_DASHED_WHITE" if dashed else "SINGLE_SOLID_WHITE"
            b.layers["lane_divider"].append({
                "token": b.token("lane_divider"), "line_token": line_token,
                "lane_divider_segments": [{"node_token": n, "segment_type": seg} for n in nodes]})

    # Ped crossings and stop lines.
    crossing_tokens = {}
    for road, k, a, c in crossings(city):
        poly = box(*_xyxy(_rect_along(road, a, c, -road.half_width, road.half_width)))
        t = b.token("ped_crossing")
        b.layers["ped_crossing"].append({"token": t, "polygon_token": b.polygon(poly),
                                         "road_segment_token": segment_of[(road.axis, road.index, k)]})
        crossing_tokens[(road.axis, road.index, k, a < (_road_sections(city, road)[k][1] + 10))] = t
    for lane in city.lanes:
        road = road_of(city, lane)
        xe, ye, h = lane.end()
        d = np.array([np.cos(h), np.sin(h)])
        nl = np.array([-np.sin(h), np.cos(h)])
        back = CROSSWALK_GAP + CROSSWALK_DEPTH + 0.8
        cpt = np.array([xe, ye]) - back * d
        corners = [cpt - d * 0.2 - nl * LANE_WIDTH / 2, cpt + d * 0.2 - nl * LANE_WIDTH / 2,
                   cpt + d * 0.2 + nl * LANE_WIDTH / 2, cpt - d * 0.2 + nl * LANE_WIDTH / 2]
        at_start = lane.direction < 0
        b.layers["stop_line"].append({
            "token": b.token("stop_line"),
            "polygon_token": b.polygon(Polygon(corners)),
            "stop_line_type": "PED_CROSSING",
            "ped_crossing_tokens": [crossing_tokens[(road.axis, road.index, lane.section, at_start)]],
            "traffic_light_tokens": [],
            "road_block_token": "",
        })

    # Walkways: the sidewalk ring around every block of land.
    for x0, x1, y0, y1 in block_cells(city):
        outer = box(x0 - SIDEWALK, y0 - SIDEWALK, x1 + SIDEWALK, y1 + SIDEWALK)
        ring = outer.difference(box(x0, y0, x1, y1)).difference(drivable)
        ring = ring.intersection(box(0, 0, city.width, city.height))
        for part in ([ring] if ring.geom_type == "Polygon" else list(getattr(ring, "geoms", []))):
            if part.geom_type == "Polygon" and part.area > 1.0:
                b.layers["walkway"].append({"token": b.token("walkway"), "polygon_token": b.polygon(part)})

    out = dict(b.layers)
    out["arcline_path_3"] = b.arcline_path_3
    out["connectivity"] = b.connectivity
    out["canvas_edge"] = [float(city.canvas_edge[0]), float(city.canvas_edge[1])]
    out["version"] = MAP_VERSION
    return out


def _xyxy(rect):
    xmin, xmax, ymin, ymax = rect
    return xmin, ymin, xmax, ymax


def drivable_mask_png(city: City, path, resolution: float = 0.1) -> None:
    """The ``map`` table's semantic prior: drivable area as a greyscale PNG at 10 px/m.

    Row 0 is the canvas's north edge, as the devkit's ``MapMask`` expects.
    """
    w = int(np.ceil(city.canvas_edge[0] / resolution))
    h = int(np.ceil(city.canvas_edge[1] / resolution))
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    roads = city.ew_roads + city.ns_roads
    for road in roads:
        a, c = _road_span(city, road)
        xmin, xmax, ymin, ymax = _rect_along(road, a, c, -road.half_width, road.half_width)
        corners = np.array([[xmin, ymin, 0], [xmax, ymin, 0], [xmax, ymax, 0], [xmin, ymax, 0]])
        g = apply(city.global_from_city, corners)[:, :2]
        draw.polygon([(x / resolution, h - y / resolution) for x, y in g], fill=255)
    img.save(path, optimize=True)
