"""Scenario: the ego's drive and the agents around it, simulated on a 20 Hz clock.

Vehicles follow random routes on the lane graph with the intelligent driver model (they keep
their distance and yield to pedestrians and, by priority, to crossing traffic); pedestrians walk
the sidewalks and crossings; parked vehicles, bike racks and work zones sit on shoulders and
sidewalks. Every agent's state is sampled on one time grid, so any keyframe or sweep is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bevkit.data.synth.city import (
    CROSSWALK_DEPTH,
    CROSSWALK_GAP,
    LANE_WIDTH,
    SHOULDER,
    SIDEWALK,
    City,
    road_of,
    stable_seed,
)
from bevkit.data.synth.paths import Path, Piece, turn_pieces

DT = 0.05  # simulation step, seconds (the LiDAR's 20 Hz)

# category -> (mean length, width, height, Occ3D class, detection class or None, attribute group)
CATEGORIES = {
    "vehicle.car": (4.63, 1.96, 1.74, 4, "car", "vehicle"),
    "vehicle.emergency.police": (4.95, 2.00, 1.85, 4, None, "vehicle"),
    "vehicle.truck": (6.95, 2.51, 2.84, 10, "truck", "vehicle"),
    "vehicle.bus.rigid": (11.2, 2.94, 3.47, 3, "bus", "vehicle"),
    "vehicle.bus.bendy": (16.5, 2.95, 3.35, 3, "bus", "vehicle"),
    "vehicle.trailer": (12.0, 2.90, 3.80, 9, "trailer", "vehicle"),
    "vehicle.construction": (6.37, 2.82, 3.19, 5, "construction_vehicle", "vehicle"),
    "vehicle.motorcycle": (2.11, 0.77, 1.47, 6, "motorcycle", "cycle"),
    "vehicle.bicycle": (1.70, 0.60, 1.28, 2, "bicycle", "cycle"),
    "human.pedestrian.adult": (0.73, 0.67, 1.77, 7, "pedestrian", "pedestrian"),
    "human.pedestrian.child": (0.52, 0.50, 1.28, 7, "pedestrian", "pedestrian"),
    "human.pedestrian.construction_worker": (0.75, 0.70, 1.78, 7, "pedestrian", "pedestrian"),
    "movable_object.barrier": (0.50, 2.53, 0.98, 1, "barrier", None),
    "movable_object.trafficcone": (0.41, 0.41, 1.07, 8, "traffic_cone", None),
    "static_object.bicycle_rack": (5.0, 1.9, 1.1, 0, None, None),
}

ATTRIBUTES = (
    "vehicle.moving", "vehicle.stopped", "vehicle.parked",
    "cycle.with_rider", "cycle.without_rider",
    "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down",
)


@dataclass
class Agent:
    """One annotated object: its category, size, look and its state on the simulation grid."""

    id: int
    category: str
    size: np.ndarray  # (3,) l, w, h
    color: np.ndarray  # (3,) main colour in [0, 1]
    mode: str  # "lane", "walk", "static"
    x: np.ndarray = None  # (T,) city frame
    y: np.ndarray = None
    yaw: np.ndarray = None
    speed: np.ndarray = None
    parked: bool = False
    rider: bool = False
    posture: str = "upright"  # pedestrians: "upright" or "sitting"
    priority: float = 0.0
    path: Path = None
    v0: float = 0.0

    @property
    def attribute_group(self):
        return CATEGORIES[self.category][5]

    def attribute(self, k: int) -> str | None:
        """The nuScenes attribute at simulation step ``k``."""
        group = self.attribute_group
        if group == "vehicle":
            if self.parked:
                return "vehicle.parked"
            return "vehicle.moving" if self.speed[k] > 0.3 else "vehicle.stopped"
        if group == "cycle":
            return "cycle.with_rider" if self.rider else "cycle.without_rider"
        if group == "pedestrian":
            if self.posture == "sitting":
                return "pedestrian.sitting_lying_down"
            return "pedestrian.moving" if self.speed[k] > 0.2 else "pedestrian.standing"
        return None


@dataclass
class Scenario:
    """The ego's trajectory and every agent's, on ``times`` (seconds from the scene start)."""

    city: City
    times: np.ndarray  # (T,)
    ego_x: np.ndarray
    ego_y: np.ndarray
    ego_yaw: np.ndarray
    ego_speed: np.ndarray
    agents: list = field(default_factory=list)
    tags: list = field(default_factory=list)


CAR_COLOURS = np.array([
    [0.92, 0.92, 0.92], [0.08, 0.08, 0.09], [0.62, 0.64, 0.66], [0.70, 0.10, 0.10], [0.12, 0.22, 0.55],
    [0.35, 0.37, 0.40], [0.85, 0.80, 0.70], [0.15, 0.35, 0.20],
])


def _look(rng, category):
    if category == "vehicle.car":
        return CAR_COLOURS[rng.integers(len(CAR_COLOURS))] * rng.uniform(0.9, 1.05)
    if category == "vehicle.emergency.police":
        return np.array([0.95, 0.95, 0.97])
    if category == "vehicle.truck":
        return np.array([[0.9, 0.9, 0.88], [0.2, 0.35, 0.6], [0.65, 0.15, 0.12]])[rng.integers(3)]
    if category.startswith("vehicle.bus"):
        return np.array([[0.85, 0.2, 0.15], [0.2, 0.45, 0.75], [0.95, 0.95, 0.92]])[rng.integers(3)]
    if category == "vehicle.trailer":
        return np.array([0.82, 0.82, 0.80]) * rng.uniform(0.85, 1.05)
    if category == "vehicle.construction":
        return np.array([0.95, 0.72, 0.05])
    if category in ("vehicle.motorcycle", "vehicle.bicycle"):
        return np.array([[0.1, 0.1, 0.12], [0.7, 0.1, 0.1], [0.15, 0.3, 0.7]])[rng.integers(3)]
    if category == "human.pedestrian.construction_worker":
        return np.array([1.0, 0.55, 0.05])
    if category.startswith("human"):
        return rng.uniform(0.1, 0.9, size=3)
    return np.array([0.5, 0.5, 0.5])


def _size(rng, category):
    l, w, h = CATEGORIES[category][:3]
    jitter = 0.04 if category.startswith(("movable", "static")) else 0.08
    return np.array([l, w, h]) * rng.uniform(1 - jitter, 1 + jitter, size=3)


# --------------------------------------------------------------------------------- simulation
def _idm(agents, ego, steps, rng):
    """Advance all lane agents (and the ego, index 0 in ``movers``) with the intelligent driver model.

    Obstacles are every other agent's position at each step: walkers and static objects are known
    beforehand, lane agents are simulated together.
    """
    movers = [ego] + [a for a in agents if a.mode == "lane"]
    others = [a for a in agents if a.mode != "lane"]
    n = len(movers)
    length = np.array([m.size[0] for m in movers])
    width = np.array([m.size[1] for m in movers])
    v0 = np.array([m.v0 for m in movers])
    prio = np.array([m.priority for m in movers])
    s = np.zeros(n)
    v = v0 * 0.85
    a_max, b_comf, t_head, s_min = 1.6, 2.5, 1.3, 2.5
    out_s = np.zeros((n, steps))
    out_v = np.zeros((n, steps))
    ox = np.array([a.x for a in others]).reshape(len(others), steps)
    oy = np.array([a.y for a in others]).reshape(len(others), steps)
    oyaw = np.array([a.yaw for a in others]).reshape(len(others), steps)
    ol = np.array([a.size[0] for a in others])
    ow = np.array([a.size[1] for a in others])
    ov = np.array([a.speed for a in others]).reshape(len(others), steps)
    # Each mover's path tabulated every 0.1 m, all in one array, so a step evaluates every mover
    # with a handful of vectorised gathers.
    ds = 0.1
    tables, offsets, counts = [], [], []
    for m in movers:
        grid = np.arange(0.0, m.path.length + ds, ds)
        x, y, h, kappa = m.path.at(grid)
        offsets.append(sum(counts))
        counts.append(len(grid))
        tables.append(np.stack([x, y, np.cos(h), np.sin(h), np.abs(kappa)], axis=1))
    table = np.concatenate(tables)
    offsets = np.array(offsets)
    last = np.array(counts) - 1

    def lookup(s_query):
        i = np.minimum(np.rint(s_query / ds).astype(np.int64), last) + offsets
        return table[i]

    for k in range(steps):
        row = lookup(s)
        px, py = row[:, 0], row[:, 1]
        ph = np.arctan2(row[:, 3], row[:, 2])
        out_s[:, k] = s
        out_v[:, k] = v
        # Everything as seen from every mover: forward and lateral offsets.
        ax = np.concatenate([px, ox[:, k]])
        ay = np.concatenate([py, oy[:, k]])
        ah = np.concatenate([ph, oyaw[:, k]])
        al = np.concatenate([length, ol])
        aw = np.concatenate([width, ow])
        av = np.concatenate([v, ov[:, k]])
        is_walker = np.concatenate([np.zeros(n, bool), np.array([a.mode == "walk" for a in others], bool)])
        aprio = np.concatenate([prio, np.full(len(others), np.inf)])
        dx = ax[None, :] - px[:, None]
        dy = ay[None, :] - py[:, None]
        c, sn = np.cos(ph)[:, None], np.sin(ph)[:, None]
        fwd = c * dx + sn * dy
        lat = -sn * dx + c * dy
        dh = np.abs((ah[None, :] - ph[:, None] + np.pi) % (2 * np.pi) - np.pi)
        same_dir = dh < np.deg2rad(50)
        corridor = np.abs(lat) < (width[:, None] + aw[None, :]) / 2 + 0.4
        yields = same_dir | is_walker[None, :] | (aprio[None, :] > prio[:, None])
        near = (fwd > 0) & corridor & (((fwd < 60) & same_dir) | ((fwd < 14) & yields))
        np.fill_diagonal(near[:, :n], False)
        gap = np.where(near, fwd - (length[:, None] + al[None, :]) / 2, np.inf)
        lead = np.argmin(gap, axis=1)
        g = gap[np.arange(n), lead]
        dv = v - np.where(same_dir[np.arange(n), lead], av[lead] * np.cos(dh[np.arange(n), lead]), 0.0)
        s_star = s_min + v * t_head + v * dv / (2 * np.sqrt(a_max * b_comf))
        interaction = np.where(np.isfinite(g), (np.maximum(s_star, 0) / np.maximum(g, 0.1)) ** 2, 0.0)
        # Slow down before turns: the curvature a short way ahead caps the speed.
        curv = lookup(s + 8.0)[:, 4]
        v_cap = np.where(curv > 0, np.sqrt(2.0 / np.maximum(curv, 1e-6)), np.inf)
        v_des = np.minimum(v0, np.maximum(v_cap, 2.5))
        acc = a_max * (1 - (v / np.maximum(v_des, 0.1)) ** 4 - interaction)
        acc = np.clip(acc, -7.0, a_max)
        v_new = np.maximum(v + acc * DT, 0.0)
        s = s + (v + v_new) / 2 * DT
        v = v_new
    for i, m in enumerate(movers):
        x, y, h, _ = m.path.at(out_s[i])
        m.x, m.y, m.yaw, m.speed = x, y, h, out_v[i]


def _sidewalk_loop(city: City, i: int, j: int):
    """Corners of the sidewalk centre loop around the block between NS roads i, i+1 and EW j, j+1."""
    ns0, ns1, ew0, ew1 = city.ns_roads[i], city.ns_roads[i + 1], city.ew_roads[j], city.ew_roads[j + 1]
    x0 = ns0.pos + ns0.half_width + SIDEWALK * 0.45
    x1 = ns1.pos - ns1.half_width - SIDEWALK * 0.45
    y0 = ew0.pos + ew0.half_width + SIDEWALK * 0.45
    y1 = ew1.pos - ew1.half_width - SIDEWALK * 0.45
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def _loop_path(corners: np.ndarray, start_edge: int, start_frac: float, direction: int, min_length: float) -> Path:
    """A walk around a rectangle of corners with rounded turns, starting part-way along one edge."""
    if direction < 0:
        corners = corners[::-1]
        start_edge = 3 - start_edge
        start_frac = 1 - start_frac
    pieces = []
    total = 0.0
    e = start_edge
    first = True
    r = 1.0
    while total < min_length:
        a, b = corners[e % 4], corners[(e + 1) % 4]
        d = b - a
        ln = float(np.linalg.norm(d))
        h = float(np.arctan2(d[1], d[0]))
        s0 = max(r, start_frac * ln) if first else r
        # A start closer to the corner than the turn needs moves back to leave the turn its radius (the
        # only starts this changes are those that used to overshoot the corner and fail).
        s0 = min(s0, ln - r - 0.01)
        first = False
        p0 = a + d / ln * s0
        seg = Piece(float(p0[0]), float(p0[1]), h, max(ln - r - s0, 0.01))
        pieces.append(seg)
        total += seg.length
        c = corners[(e + 2) % 4]
        d2 = c - b
        h2 = float(np.arctan2(d2[1], d2[0]))
        ex, ey, _ = seg.end()
        q = b + d2 / np.linalg.norm(d2) * r
        turn = turn_pieces(ex, ey, h, float(q[0]), float(q[1]), h2)
        pieces.extend(turn)
        total += sum(p.length for p in turn)
        e += 1
    return Path(pieces)


def _speed_profile(rng, steps, v_walk, pause_prob):
    """Walking speed per step with occasional pauses (smooth at 1 m/s^2)."""
    target = np.full(steps, v_walk)
    k = 0
    while k < steps:
        if rng.random() < pause_prob:
            dur = int(rng.uniform(1.5, 5.0) / DT)
            target[k : k + dur] = 0.0
            k += dur
        k += int(rng.uniform(3.0, 8.0) / DT)
    v = np.empty(steps)
    cur = target[0]
    for k in range(steps):
        cur += np.clip(target[k] - cur, -1.0 * DT, 1.0 * DT)
        v[k] = cur
    return v


def _follow(agent: Agent, speed: np.ndarray) -> None:
    s = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * DT)])
    x, y, h, _ = agent.path.at(s)
    agent.x, agent.y, agent.yaw, agent.speed = x, y, h, speed


def _static(agent: Agent, steps, x, y, yaw):
    agent.x = np.full(steps, float(x))
    agent.y = np.full(steps, float(y))
    agent.yaw = np.full(steps, float(yaw))
    agent.speed = np.zeros(steps)


def _box_corners(x, y, yaw, l, w):
    c, s = np.cos(yaw), np.sin(yaw)
    dx = np.array([1, 1, -1, -1]) * l / 2
    dy = np.array([1, -1, -1, 1]) * w / 2
    return np.stack([x + c * dx - s * dy, y + s * dx + c * dy], axis=-1)


def _overlap(a, b) -> bool:
    """Separating-axis test of two oriented rectangles given as (4, 2) corners."""
    for poly in (a, b):
        for i in range(4):
            e = poly[(i + 1) % 4] - poly[i]
            axis = np.array([-e[1], e[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


def _drop_collisions(scn: Scenario, check_steps: np.ndarray) -> None:
    """Remove agents whose footprint overlaps the ego's or an earlier agent's at any checked step."""
    keep = []
    ego_fp = [(_box_corners(scn.ego_x[k], scn.ego_y[k], scn.ego_yaw[k], 4.8, 2.0)) for k in check_steps]
    for a in scn.agents:
        if a.category == "static_object.bicycle_rack":
            keep.append(a)
            continue
        ok = True
        for n, k in enumerate(check_steps):
            fa = _box_corners(a.x[k], a.y[k], a.yaw[k], a.size[0], a.size[1])
            if _overlap(fa, ego_fp[n]):
                ok = False
                break
            for b in keep:
                if b.category == "static_object.bicycle_rack":
                    continue
                if abs(a.x[k] - b.x[k]) + abs(a.y[k] - b.y[k]) > (a.size[0] + b.size[0]) * 1.5:
                    continue
                if _overlap(fa, _box_corners(b.x[k], b.y[k], b.yaw[k], b.size[0], b.size[1])):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            keep.append(a)
    for i, a in enumerate(keep):
        a.id = i
    scn.agents = keep


# ----------------------------------------------------------------------------------- scenario
def make_scenario(city: City, seed: int, scene_index: int, duration: float) -> Scenario:
    """Simulate one scene of ``duration`` seconds in a city; deterministic for (seed, scene_index)."""
    rng = np.random.default_rng(stable_seed("scene", city.location, seed, scene_index))
    steps = int(round(duration / DT)) + 1
    times = np.arange(steps) * DT
    agents: list[Agent] = []

    def new(category, mode, **kw):
        a = Agent(len(agents), category, _size(rng, category), _look(rng, category), mode, **kw)
        a.priority = rng.random()
        agents.append(a)
        return a

    # The ego: an inner lane of the grid, so that scenes of a location share streets.
    centre = np.array([city.width / 2, city.height / 2])
    inner = [ln for ln in city.lanes
             if np.hypot(ln.x0 - centre[0], ln.y0 - centre[1]) < 0.3 * min(city.width, city.height)]
    ego_lane = inner[rng.integers(len(inner))]
    ego_v0 = rng.uniform(7.5, 11.5)
    ego = Agent(-1, "vehicle.car", np.array([4.8, 2.0, 1.8]), np.zeros(3), "lane")
    ego.path = city.random_route(rng, ego_lane.id, rng.uniform(0.0, 0.4) * ego_lane.length,
                                 ego_v0 * duration + 80.0)
    ego.v0 = ego_v0
    ego.priority = np.inf
    ego_lane_spans = _route_lanes(city, ego.path)

    # Points of interest along the ego's drive, so that every class is seen close by in every
    # scene: a work zone (barriers, cones, a construction vehicle and workers), a bike rack, a
    # trailer, a truck and a bus at its stop parked across the road, and kerb-side parking.
    drive = ego_v0 * duration * 0.8
    kinds = ("workzone", "featured", "bikerack", "parking")
    span = max(drive, 20.0) - 8.0
    poi_s = 8.0 + (np.arange(len(kinds)) + rng.uniform(0.2, 0.8, size=len(kinds))) * span / len(kinds)
    side = 1.0 if city.drive_left else -1.0
    for kind, s_poi in zip(kinds, poi_s):
        lane, along = _lane_at(ego_lane_spans, s_poi)
        if lane is None:
            continue
        road = road_of(city, lane)
        along = float(np.clip(along, min(30.0, lane.length / 2), max(lane.length - 30.0, lane.length / 2)))
        h = lane.heading
        fwd = np.array([np.cos(h), np.sin(h)])
        nl = np.array([-np.sin(h), np.cos(h)])
        base = np.array([lane.x0, lane.y0]) + along * fwd
        centre_line = base - nl * side * (lane.index + 0.5) * LANE_WIDTH
        # "across" is the far side of the road, facing the other way.
        flip = -1.0 if kind == "featured" else 1.0
        shoulder = centre_line + nl * side * flip * (road.half_width - SHOULDER / 2)
        curb_walk = centre_line + nl * side * (road.half_width + SIDEWALK * 0.55)
        room = min(along, lane.length - along) - 8.0
        if room < 6.0:
            continue
        if kind == "workzone":
            zone = min(22.0, 2 * room)
            edge = shoulder - nl * side * (SHOULDER / 2 - 0.3)
            t_cv = rng.uniform(-zone / 4, zone / 4)
            cv = new("vehicle.construction", "static", parked=True)
            cv.size[1] = min(cv.size[1], SHOULDER - 0.2)
            p = shoulder + fwd * t_cv + nl * side * 0.15
            _static(cv, steps, p[0], p[1], h)
            for t in np.arange(-zone / 2, zone / 2 + 0.1, 3.0):
                if abs(t - t_cv) < cv.size[0] / 2 + 0.6:
                    continue
                p = edge + fwd * t
                _static(new("movable_object.trafficcone", "static"), steps, p[0], p[1], h)
            for t in (-zone / 2 - 1.0, zone / 2 + 1.0):
                p = shoulder + fwd * t
                _static(new("movable_object.barrier", "static"), steps, p[0], p[1], h)
            for _ in range(rng.integers(1, 3)):
                p = curb_walk + fwd * rng.uniform(-zone / 2, zone / 2)
                w = new("human.pedestrian.construction_worker", "static")
                _static(w, steps, p[0], p[1], rng.uniform(-np.pi, np.pi))
        elif kind == "bikerack":
            rack = new("static_object.bicycle_rack", "static")
            _static(rack, steps, curb_walk[0], curb_walk[1], h)
            n_bikes = rng.integers(2, 4)
            for k in range(n_bikes):
                p = curb_walk + fwd * (-rack.size[0] / 2 + (k + 0.5) * rack.size[0] / n_bikes)
                bike = new("vehicle.bicycle" if rng.random() < 0.8 else "vehicle.motorcycle", "static", parked=True)
                bike.size[0] = min(bike.size[0], rack.size[1] - 0.1)
                _static(bike, steps, p[0], p[1], h + np.pi / 2)
        else:
            queue = ["vehicle.trailer", "vehicle.truck", "vehicle.bus.rigid"] if kind == "featured" else []
            heading = h + (np.pi if flip < 0 else 0.0)
            t = -room
            while t < room:
                cat = queue.pop(0) if queue else str(rng.choice(
                    ["vehicle.car", "vehicle.truck", "vehicle.trailer", "vehicle.motorcycle",
                     "vehicle.emergency.police"], p=[0.55, 0.15, 0.12, 0.13, 0.05]))
                a = new(cat, "static", parked=not cat.startswith("vehicle.bus"))
                a.size[1] = min(a.size[1], SHOULDER + 0.3)
                if t + a.size[0] > room and not queue and kind != "featured":
                    agents.pop()
                    break
                p = shoulder + fwd * (t + a.size[0] / 2)
                _static(a, steps, p[0], p[1], heading)
                t += a.size[0] + rng.uniform(1.0, 4.0)
                if kind == "featured" and not queue:
                    break

    # Traffic on lanes near the drive.
    ex, ey, _, _ = ego.path.at(np.linspace(0, min(ego.path.length, ego_v0 * duration + 20), 30))
    def near_drive(px, py, dist):
        return np.min(np.hypot(ex - px, ey - py)) < dist

    for lane in city.lanes:
        if not near_drive(lane.x0 + lane.length / 2 * np.cos(lane.heading),
                          lane.y0 + lane.length / 2 * np.sin(lane.heading), 60.0 + lane.length / 2):
            continue
        s = rng.uniform(2.0, 25.0)
        while s < lane.length - 5:
            x, y, _ = city.lane_pose(lane.id, s)
            if near_drive(x, y, 110.0) and rng.random() < 0.55:
                cat = str(rng.choice(
                    ["vehicle.car", "vehicle.truck", "vehicle.bus.rigid", "vehicle.bus.bendy", "vehicle.motorcycle",
                     "vehicle.bicycle", "vehicle.construction"],
                    p=[0.64, 0.1, 0.07, 0.02, 0.08, 0.07, 0.02]))
                a = new(cat, "lane")
                if cat == "vehicle.bicycle":
                    a.v0 = rng.uniform(3.5, 6.0)
                elif cat == "vehicle.motorcycle":
                    a.v0 = rng.uniform(7.0, 12.0)
                elif cat.startswith(("vehicle.bus", "vehicle.truck", "vehicle.construction")):
                    a.v0 = rng.uniform(6.0, 9.5)
                else:
                    a.v0 = rng.uniform(7.0, 12.5)
                if cat in ("vehicle.bicycle", "vehicle.motorcycle"):
                    a.rider = True
                    a.size[2] = max(a.size[2], 1.7)
                a.path = city.random_route(rng, lane.id, s, a.v0 * duration + 40.0)
            s += rng.uniform(14.0, 40.0)

    # Pedestrians on the sidewalks of the blocks around the drive, some crossing.
    n_i, n_j = len(city.ns_roads) - 1, len(city.ew_roads) - 1
    for i in range(n_i):
        for j in range(n_j):
            corners = _sidewalk_loop(city, i, j)
            cx, cy = corners.mean(axis=0)
            if not near_drive(cx, cy, 140.0):
                continue
            for _ in range(rng.integers(10, 20)):
                r = rng.random()
                cat = "human.pedestrian.child" if rng.random() < 0.1 else "human.pedestrian.adult"
                if r < 0.7:
                    a = new(cat, "walk")
                    a.path = _loop_path(corners, int(rng.integers(4)), rng.random(), int(rng.choice([-1, 1])), 2.0 * duration + 10)
                    _follow(a, _speed_profile(rng, steps, rng.uniform(0.9, 1.6), 0.15))
                    if not near_drive(a.x[0], a.y[0], 70.0):
                        agents.pop()
                elif r < 0.85:
                    a = new(cat, "static")
                    e = int(rng.integers(4))
                    p = corners[e] + (corners[(e + 1) % 4] - corners[e]) * rng.uniform(0.1, 0.9)
                    if rng.random() < 0.2:
                        a.posture = "sitting"
                        a.size[2] = 1.1
                    _static(a, steps, p[0], p[1], rng.uniform(-np.pi, np.pi))
                    if not near_drive(p[0], p[1], 70.0):
                        agents.pop()
                else:
                    a = new(cat, "walk")
                    a.path = _crossing_path(rng, corners, 2.0 * duration + 10)
                    _follow(a, _speed_profile(rng, steps, rng.uniform(1.1, 1.6), 0.1))
                    if not near_drive(a.x[0], a.y[0], 70.0):
                        agents.pop()

    # Parked vehicles along shoulders near the drive.
    for lane in city.lanes:
        road = road_of(city, lane)
        if lane.index != road.lanes - 1 or rng.random() < 0.4:
            continue
        h = lane.heading
        fwd = np.array([np.cos(h), np.sin(h)])
        nl = np.array([-np.sin(h), np.cos(h)])
        shoulder0 = np.array([lane.x0, lane.y0]) + nl * side * (LANE_WIDTH / 2 + SHOULDER / 2)
        t = CROSSWALK_GAP + CROSSWALK_DEPTH + rng.uniform(4, 30)
        while t < lane.length - CROSSWALK_GAP - CROSSWALK_DEPTH - 10:
            p = shoulder0 + fwd * t
            if near_drive(p[0], p[1], 70.0) and rng.random() < 0.6:
                cat = str(rng.choice(["vehicle.car", "vehicle.truck", "vehicle.motorcycle", "vehicle.trailer"],
                                     p=[0.8, 0.08, 0.07, 0.05]))
                a = new(cat, "static", parked=True)
                a.size[1] = min(a.size[1], SHOULDER + 0.3)
                p = shoulder0 + fwd * (t + a.size[0] / 2)
                _static(a, steps, p[0], p[1], h)
                t += a.size[0]
            t += rng.uniform(2.0, 14.0)

    _idm(agents, ego, steps, rng)
    scn = Scenario(city, times, ego.x, ego.y, ego.yaw, ego.speed, agents)
    _drop_collisions(scn, np.arange(0, steps, 5))
    return scn


def _route_lanes(city: City, path: Path):
    """(path arc length at lane start, lane) for each straight lane piece of a route."""
    out = []
    for start, piece in zip(path.starts[:-1], path.pieces):
        if piece.turn != 0:
            continue
        for lane in city.lanes:
            if abs(lane.heading - piece.h) < 1e-6 and _on_lane(lane, piece.x, piece.y):
                along = (piece.x - lane.x0) * np.cos(lane.heading) + (piece.y - lane.y0) * np.sin(lane.heading)
                out.append((float(start - along), lane))
                break
    return out


def _on_lane(lane, x, y) -> bool:
    c, s = np.cos(lane.heading), np.sin(lane.heading)
    along = (x - lane.x0) * c + (y - lane.y0) * s
    lat = -(x - lane.x0) * s + (y - lane.y0) * c
    return abs(lat) < 0.1 and -0.1 <= along <= lane.length + 0.1


def _lane_at(spans, s):
    for start, lane in spans:
        if start <= s <= start + lane.length:
            return lane, s - start
    return None, None


def _crossing_path(rng, corners, min_length) -> Path:
    """Walk straight on along a sidewalk edge past the block's corner.

    The sidewalk centre line of a block meets the crossing of the side street at the corner
    (crossings sit just outside the intersection box), so walking straight on crosses the side
    street on its zebra and continues along the next block.
    """
    e = int(rng.integers(4))
    a, b = corners[e], corners[(e + 1) % 4]
    d = (b - a) / np.linalg.norm(b - a)
    start = a + (b - a) * rng.uniform(0.5, 0.9)
    return Path([Piece(float(start[0]), float(start[1]), float(np.arctan2(d[1], d[0])), min_length)])
