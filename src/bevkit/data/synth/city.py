"""A procedural city per location: road grid, lanes, markings, sidewalks, buildings, trees.

Everything is built in the city's own frame (metres, x east-ish, y north-ish, origin at the city's
south-west corner); ``global_from_city`` rotates and shifts it onto the map canvas, which is the
nuScenes ``global`` frame written to the tables and the map-expansion JSON.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from bevkit.data.synth.paths import Path, Piece, turn_pieces
from bevkit.geometry import make_transform, yaw_to_matrix

LANE_WIDTH = 3.5
SHOULDER = 2.5
SIDEWALK = 3.5
GRASS = 3.0
CROSSWALK_DEPTH = 4.0
CROSSWALK_GAP = 0.5  # from the intersection box to the crossing
RIM = 60.0  # land with sidewalks, trees and buildings around the outer ring road
RASTER_RES = 0.05  # metres per ground-raster cell

# Ground-raster codes (uint8).
G_GRASS, G_ROAD, G_WHITE, G_YELLOW, G_SIDEWALK, G_CROSSWALK = 0, 1, 2, 3, 4, 5

# The four nuScenes map names (tools such as the devkit's map API accept only these).
LOCATIONS = {
    "boston-seaport": dict(drive_left=False, divider=G_YELLOW, rotation_deg=23.0),
    "singapore-onenorth": dict(drive_left=True, divider=G_WHITE, rotation_deg=-12.0),
    "singapore-queenstown": dict(drive_left=True, divider=G_WHITE, rotation_deg=37.0),
    "singapore-hollandvillage": dict(drive_left=True, divider=G_WHITE, rotation_deg=5.0),
}


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, stable across processes and runs."""
    digest = hashlib.md5("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Road:
    """A straight two-way road across the whole grid. ``axis`` 0 runs along x (at y=pos), 1 along y."""

    index: int
    axis: int
    pos: float
    lanes: int  # per direction

    @property
    def half_width(self) -> float:
        return SHOULDER + self.lanes * LANE_WIDTH


@dataclass
class Lane:
    """A directed lane along one street section, from one intersection to the next."""

    id: int
    road: int
    section: int
    direction: int  # +1 along the road's axis, -1 against it
    index: int  # 0 next to the centre line, lanes-1 next to the shoulder
    x0: float
    y0: float
    heading: float
    length: float
    start_node: tuple
    end_node: tuple

    def path(self) -> Path:
        return Path([Piece(self.x0, self.y0, self.heading, self.length)])

    def end(self) -> tuple[float, float, float]:
        return (
            self.x0 + self.length * np.cos(self.heading),
            self.y0 + self.length * np.sin(self.heading),
            self.heading,
        )


@dataclass
class Connector:
    """A path through an intersection from the end of one lane to the start of another."""

    id: int
    node: tuple
    lane_in: int
    lane_out: int
    turn: str  # "straight", "left", "right"
    pieces: list


@dataclass
class StaticScene:
    """Static primitives of a city as flat arrays (see ``bevkit.data.synth.render.Prims``)."""

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    color: np.ndarray
    material: np.ndarray


@dataclass
class City:
    """A city: its road grid, lane graph, ground raster and static objects, in the city frame."""

    location: str
    drive_left: bool
    divider_code: int
    width: float
    height: float
    ns_roads: list  # roads along y, at x = pos (sorted)
    ew_roads: list  # roads along x, at y = pos (sorted)
    lanes: list
    connectors: list
    global_from_city: np.ndarray
    canvas_edge: tuple
    static: StaticScene
    ground: np.ndarray = field(repr=False)  # (rows=y, cols=x) uint8 codes at RASTER_RES
    out_connectors: dict = field(default_factory=dict)  # lane id -> [connector ids]

    # ---------------------------------------------------------------- queries
    def intersection_box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) of the intersection of NS road i and EW road j."""
        ns, ew = self.ns_roads[i], self.ew_roads[j]
        return ns.pos - ns.half_width, ns.pos + ns.half_width, ew.pos - ew.half_width, ew.pos + ew.half_width

    def ground_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground-raster code at city-frame points (grass outside the raster).

        Shapes:
            x, y: (K,)   returns: (K,) uint8
        """
        col = np.floor(x / RASTER_RES).astype(np.int64)
        row = np.floor(y / RASTER_RES).astype(np.int64)
        rows, cols = self.ground.shape
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        out = np.full(x.shape, G_GRASS, dtype=np.uint8)
        out[inside] = self.ground[row[inside], col[inside]]
        return out

    def lane_pose(self, lane_id: int, s: float) -> tuple[float, float, float]:
        lane = self.lanes[lane_id]
        return lane.x0 + s * np.cos(lane.heading), lane.y0 + s * np.sin(lane.heading), lane.heading

    def random_route(self, rng: np.random.Generator, lane_id: int, start_s: float, min_length: float,
                     turn_weights=(0.5, 0.25, 0.25)) -> Path:
        """A path starting ``start_s`` metres into a lane, turning at random at intersections.

        ``turn_weights`` weigh straight, left and right where those exist.
        """
        lane = self.lanes[lane_id]
        x, y, h = self.lane_pose(lane_id, start_s)
        pieces = [Piece(x, y, h, max(lane.length - start_s, 1e-3))]
        total = pieces[0].length
        current = lane_id
        while total < min_length:
            options = [self.connectors[c] for c in self.out_connectors.get(current, [])]
            if not options:
                break
            weights = np.array([dict(zip(("straight", "left", "right"), turn_weights))[c.turn] for c in options])
            conn = options[rng.choice(len(options), p=weights / weights.sum())]
            pieces.extend(conn.pieces)
            nxt = self.lanes[conn.lane_out]
            pieces.append(Piece(nxt.x0, nxt.y0, nxt.heading, nxt.length))
            total += sum(p.length for p in conn.pieces) + nxt.length
            current = nxt.id
        return Path(pieces)


# ------------------------------------------------------------------------------------ building
def build_city(location: str, seed: int) -> City:
    """Build the city for a location; the same (location, seed) always gives the same city."""
    if location not in LOCATIONS:
        raise ValueError(f"unknown location {location!r}; expected one of {sorted(LOCATIONS)}")
    spec = LOCATIONS[location]
    rng = np.random.default_rng(stable_seed("city", location, seed))

    n_roads = 5
    ns_lanes = rng.choice([1, 2], size=n_roads, p=[0.4, 0.6])
    ew_lanes = rng.choice([1, 2], size=n_roads, p=[0.4, 0.6])
    ns_gaps = rng.uniform(95.0, 135.0, size=n_roads - 1)
    ew_gaps = rng.uniform(95.0, 135.0, size=n_roads - 1)
    ns_pos = RIM + SHOULDER + 2 * LANE_WIDTH + np.concatenate([[0.0], np.cumsum(ns_gaps)])
    ew_pos = RIM + SHOULDER + 2 * LANE_WIDTH + np.concatenate([[0.0], np.cumsum(ew_gaps)])
    ns_roads = [Road(i, 1, float(p), int(n)) for i, (p, n) in enumerate(zip(ns_pos, ns_lanes))]
    ew_roads = [Road(j, 0, float(p), int(n)) for j, (p, n) in enumerate(zip(ew_pos, ew_lanes))]
    width = float(ns_pos[-1] + ns_roads[-1].half_width + RIM)
    height = float(ew_pos[-1] + ew_roads[-1].half_width + RIM)

    # The canvas: the city rotated, shifted so that every corner lies inside with a margin.
    rot = yaw_to_matrix(np.deg2rad(spec["rotation_deg"]))
    corners = np.array([[0, 0, 0], [width, 0, 0], [0, height, 0], [width, height, 0]]) @ rot.T
    margin = 50.0
    offset = -corners.min(axis=0) + margin
    offset[2] = 0.0
    global_from_city = make_transform(rot, offset)
    canvas = (float(np.ceil(corners[:, 0].max() + offset[0] + margin)),
              float(np.ceil(corners[:, 1].max() + offset[1] + margin)))

    city = City(
        location=location,
        drive_left=bool(spec["drive_left"]),
        divider_code=int(spec["divider"]),
        width=width,
        height=height,
        ns_roads=ns_roads,
        ew_roads=ew_roads,
        lanes=[],
        connectors=[],
        global_from_city=global_from_city,
        canvas_edge=canvas,
        static=None,
        ground=np.zeros((1, 1), np.uint8),
    )
    _build_lanes(city)
    _build_connectors(city)
    city.ground = _rasterise_ground(city)
    city.static = _build_static(city, rng)
    return city


def _road_sections(city: City, road: Road):
    """(section index, start, end, start node, end node) along a road, between intersections."""
    cross = city.ew_roads if road.axis == 1 else city.ns_roads
    out = []
    for k in range(len(cross) - 1):
        a = cross[k].pos + cross[k].half_width
        b = cross[k + 1].pos - cross[k + 1].half_width
        if road.axis == 0:  # along x; nodes are (ns index, ew index)
            na, nb = (k, road.index), (k + 1, road.index)
        else:
            na, nb = (road.index, k), (road.index, k + 1)
        out.append((k, a, b, na, nb))
    return out


def _build_lanes(city: City) -> None:
    side = 1.0 if city.drive_left else -1.0  # offset along the left normal of travel
    for road in city.ew_roads + city.ns_roads:
        for k, a, b, na, nb in _road_sections(city, road):
            for direction in (+1, -1):
                heading = (0.0 if direction > 0 else np.pi) if road.axis == 0 else (
                    np.pi / 2 if direction > 0 else -np.pi / 2)
                nl = np.array([-np.sin(heading), np.cos(heading)])
                start_along = a if direction > 0 else b
                for idx in range(road.lanes):
                    off = side * (idx + 0.5) * LANE_WIDTH
                    if road.axis == 0:
                        x0, y0 = start_along + off * nl[0], road.pos + off * nl[1]
                    else:
                        x0, y0 = road.pos + off * nl[0], start_along + off * nl[1]
                    city.lanes.append(
                        Lane(
                            id=len(city.lanes),
                            road=road.index + (0 if road.axis == 0 else 100),
                            section=k,
                            direction=direction,
                            index=idx,
                            x0=float(x0),
                            y0=float(y0),
                            heading=float(heading),
                            length=float(b - a),
                            start_node=na if direction > 0 else nb,
                            end_node=nb if direction > 0 else na,
                        )
                    )


def _lanes_of(city: City, lane: Lane):
    return [m for m in city.lanes if m.road == lane.road and m.section == lane.section and m.direction == lane.direction]


def _build_connectors(city: City) -> None:
    starts = {}
    for lane in city.lanes:
        starts.setdefault(lane.start_node, []).append(lane)
    for lane_in in city.lanes:
        n_in = len(_lanes_of(city, lane_in))
        for lane_out in starts.get(lane_in.end_node, []):
            n_out = len(_lanes_of(city, lane_out))
            dh = (lane_out.heading - lane_in.heading + np.pi) % (2 * np.pi) - np.pi
            if abs(abs(dh) - np.pi) < 1e-3:
                continue  # no U-turns
            if abs(dh) < 1e-3:
                turn = "straight"
                ok = lane_out.index == min(lane_in.index, n_out - 1)
            else:
                turn = "left" if dh > 0 else "right"
                near_side = (turn == "right") != city.drive_left  # the turn that does not cross traffic
                if near_side:
                    ok = lane_in.index == n_in - 1 and lane_out.index == n_out - 1
                else:
                    ok = lane_in.index == 0 and lane_out.index == 0
            if not ok:
                continue
            x0, y0, h0 = lane_in.end()
            pieces = turn_pieces(x0, y0, h0, lane_out.x0, lane_out.y0, lane_out.heading)
            conn = Connector(len(city.connectors), lane_in.end_node, lane_in.id, lane_out.id, turn, pieces)
            city.connectors.append(conn)
            city.out_connectors.setdefault(lane_in.id, []).append(conn.id)


# ------------------------------------------------------------------------------- ground raster
def _fill(raster: np.ndarray, xmin, xmax, ymin, ymax, code) -> None:
    """Set the cells whose centres lie inside an axis-aligned rectangle (city frame)."""
    rows, cols = raster.shape
    c0 = int(np.clip(np.ceil(xmin / RASTER_RES - 0.5), 0, cols))
    c1 = int(np.clip(np.floor(xmax / RASTER_RES - 0.5) + 1, 0, cols))
    r0 = int(np.clip(np.ceil(ymin / RASTER_RES - 0.5), 0, rows))
    r1 = int(np.clip(np.floor(ymax / RASTER_RES - 0.5) + 1, 0, rows))
    if c1 > c0 and r1 > r0:
        raster[r0:r1, c0:c1] = code


def _road_span(city: City, road: Road) -> tuple[float, float]:
    """Where a road starts and ends along its axis: the outer edges of the ring road."""
    cross = city.ew_roads if road.axis == 1 else city.ns_roads
    return cross[0].pos - cross[0].half_width, cross[-1].pos + cross[-1].half_width


def road_of(city: City, lane: Lane) -> Road:
    """The road a lane belongs to."""
    return city.ew_roads[lane.road] if lane.road < 100 else city.ns_roads[lane.road - 100]


def _rect_along(road: Road, a: float, b: float, lo: float, hi: float):
    """Rectangle spanning [a, b] along a road and [lo, hi] across it (offsets from its centre line)."""
    if road.axis == 0:
        return a, b, road.pos + lo, road.pos + hi
    return road.pos + lo, road.pos + hi, a, b


def marking_lines(city: City):
    """Painted lines per street section: (road, section, a, b, offset, width, code, dashed, kind).

    ``kind`` is "road_divider" (the centre line), "lane_divider" (between lanes of one direction)
    or "edge" (between the outer lane and the shoulder). Offsets are across the road, from its
    centre line, positive to the left of the road's +axis direction.
    """
    out = []
    for road in city.ew_roads + city.ns_roads:
        sign = 1.0 if road.axis == 0 else -1.0  # +y is left of +x; -x is left of +y
        for k, a, b, _, _ in _road_sections(city, road):
            a2, b2 = a + CROSSWALK_GAP + CROSSWALK_DEPTH + 1.5, b - CROSSWALK_GAP - CROSSWALK_DEPTH - 1.5
            out.append((road, k, a2, b2, 0.0, 0.36, city.divider_code, False, "road_divider"))
            for s in (+1, -1):
                for i in range(1, road.lanes):
                    out.append((road, k, a2, b2, sign * s * i * LANE_WIDTH, 0.15, G_WHITE, True, "lane_divider"))
                out.append((road, k, a2, b2, sign * s * road.lanes * LANE_WIDTH, 0.15, G_WHITE, False, "edge"))
    return out


def crossings(city: City):
    """Ped crossings: (road, section, a, b) spans along a road, at both ends of every section."""
    out = []
    for road in city.ew_roads + city.ns_roads:
        for k, a, b, _, _ in _road_sections(city, road):
            out.append((road, k, a + CROSSWALK_GAP, a + CROSSWALK_GAP + CROSSWALK_DEPTH))
            out.append((road, k, b - CROSSWALK_GAP - CROSSWALK_DEPTH, b - CROSSWALK_GAP))
    return out


def _rasterise_ground(city: City) -> np.ndarray:
    rows = int(np.ceil(city.height / RASTER_RES))
    cols = int(np.ceil(city.width / RASTER_RES))
    g = np.full((rows, cols), G_GRASS, dtype=np.uint8)
    roads = city.ew_roads + city.ns_roads
    for layer, code in ((SIDEWALK, G_SIDEWALK), (0.0, G_ROAD)):
        for road in roads:
            a, b = _road_span(city, road)
            hw = road.half_width + layer
            _fill(g, *_rect_along(road, a - layer, b + layer, -hw, hw), code)
    for road, k, a, b, off, w, code, dashed, kind in marking_lines(city):
        if kind == "road_divider":  # a double line
            for o in (off - 0.12, off + 0.12):
                _fill(g, *_rect_along(road, a, b, o - 0.06, o + 0.06), code)
            continue
        if dashed:
            start = a
            while start < b:
                _fill(g, *_rect_along(road, start, min(start + 3.0, b), off - w / 2, off + w / 2), code)
                start += 9.0
        else:
            _fill(g, *_rect_along(road, a, b, off - w / 2, off + w / 2), code)
    for road, k, a, b in crossings(city):
        hw = road.half_width
        pos = -hw + 0.3
        while pos + 0.6 <= hw - 0.3:
            _fill(g, *_rect_along(road, a, b, pos, pos + 0.6), G_CROSSWALK)
            pos += 1.2
    # Stop lines: across the incoming lanes, just before the crossing.
    for lane in city.lanes:
        road = road_of(city, lane)
        xe, ye, h = lane.end()
        d = np.array([np.cos(h), np.sin(h)])
        back = CROSSWALK_GAP + CROSSWALK_DEPTH + 0.8
        cx, cy = xe - back * d[0], ye - back * d[1]
        if road.axis == 0:
            _fill(g, cx - 0.2, cx + 0.2, cy - LANE_WIDTH / 2 + 0.1, cy + LANE_WIDTH / 2 - 0.1, G_WHITE)
        else:
            _fill(g, cx - LANE_WIDTH / 2 + 0.1, cx + LANE_WIDTH / 2 - 0.1, cy - 0.2, cy + 0.2, G_WHITE)
    return g


# ----------------------------------------------------------------------------- static objects
# Static materials; the renderer and occupancy look these codes up (see render.MATERIALS).
M_BUILDING, M_TRUNK, M_FOLIAGE, M_POLE = 0, 1, 2, 3
K_BOX, K_CYL, K_SPHERE = 0, 1, 2


def block_cells(city: City):
    """Land between roads (and in the rim): (xmin, xmax, ymin, ymax) inside the sidewalks."""
    def edges(roads, extent):
        bounds = [0.0]
        for r in roads:
            bounds += [r.pos - r.half_width - SIDEWALK, r.pos + r.half_width + SIDEWALK]
        bounds.append(extent)
        return [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]

    return [(x0, x1, y0, y1) for x0, x1 in edges(city.ns_roads, city.width) for y0, y1 in edges(city.ew_roads, city.height)]


def _build_static(city: City, rng: np.random.Generator) -> StaticScene:
    kind, center, size, yaw, color, material = [], [], [], [], [], []

    def add(k, c, s, col, m):
        kind.append(k)
        center.append(c)
        size.append(s)
        yaw.append(0.0)
        color.append(col)
        material.append(m)

    palette = np.array([[0.75, 0.72, 0.66], [0.62, 0.55, 0.50], [0.80, 0.78, 0.74], [0.55, 0.60, 0.66],
                        [0.70, 0.62, 0.52], [0.85, 0.84, 0.80], [0.50, 0.45, 0.42]])
    for x0, x1, y0, y1 in block_cells(city):
        # Grass strip with trees and lamp posts along every side that faces a road.
        bx0, bx1, by0, by1 = x0 + GRASS, x1 - GRASS, y0 + GRASS, y1 - GRASS
        if bx1 - bx0 < 8 or by1 - by0 < 8:
            continue
        for side in range(4):
            if side == 0:
                a, b, fixed, horiz = x0, x1, y0 + GRASS / 2, True
            elif side == 1:
                a, b, fixed, horiz = x0, x1, y1 - GRASS / 2, True
            elif side == 2:
                a, b, fixed, horiz = y0, y1, x0 + GRASS / 2, False
            else:
                a, b, fixed, horiz = y0, y1, x1 - GRASS / 2, False
            t = a + rng.uniform(3, 10)
            while t < b - 3:
                px, py = (t, fixed) if horiz else (fixed, t)
                if rng.random() < 0.8:
                    trunk_h = rng.uniform(2.0, 3.0)
                    add(K_CYL, (px, py, trunk_h / 2), (0.18, 0.18, trunk_h), (0.35, 0.25, 0.18), M_TRUNK)
                    r = rng.uniform(1.3, 2.3)
                    g = rng.uniform(0.75, 1.1)
                    add(K_SPHERE, (px, py, trunk_h + 0.7 * r), (r, r, r), (0.22 * g, 0.45 * g, 0.16 * g), M_FOLIAGE)
                else:
                    add(K_CYL, (px, py, 3.5), (0.12, 0.12, 7.0), (0.45, 0.47, 0.5), M_POLE)
                t += rng.uniform(7, 16)
        # Buildings on lots along the longer side of the block.
        setback = 1.0
        ix0, ix1, iy0, iy1 = bx0 + setback, bx1 - setback, by0 + setback, by1 - setback
        along_x = (ix1 - ix0) >= (iy1 - iy0)
        lo, hi = (ix0, ix1) if along_x else (iy0, iy1)
        depth_lo, depth_hi = (iy0, iy1) if along_x else (ix0, ix1)
        pos = lo
        while pos < hi - 6:
            lot = min(rng.uniform(14, 40), hi - pos)
            if rng.random() < 0.88:
                inset = rng.uniform(0.0, 2.5)
                h = float(rng.choice([rng.uniform(6, 14), rng.uniform(14, 40)], p=[0.6, 0.4]))
                depth = min(depth_hi - depth_lo, rng.uniform(12, 45))
                # Alternate which side of the block the building sits on so both streets see fronts.
                d0 = depth_lo if rng.random() < 0.5 else depth_hi - depth
                a0, a1 = pos + inset, pos + lot - inset
                b0, b1 = d0, d0 + depth
                if along_x:
                    cx, cy, l, w = (a0 + a1) / 2, (b0 + b1) / 2, a1 - a0, b1 - b0
                else:
                    cx, cy, l, w = (b0 + b1) / 2, (a0 + a1) / 2, b1 - b0, a1 - a0
                if l > 3 and w > 3:
                    add(K_BOX, (cx, cy, h / 2), (l, w, h), palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.1),
                        M_BUILDING)
            pos += lot
    return StaticScene(
        kind=np.array(kind, np.int8),
        center=np.array(center, np.float64),
        size=np.array(size, np.float64),
        yaw=np.array(yaw, np.float64),
        color=np.clip(np.array(color, np.float64), 0, 1),
        material=np.array(material, np.int16),
    )
