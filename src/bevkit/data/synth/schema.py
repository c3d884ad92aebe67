"""The fixed nuScenes v1.0 vocabularies: categories (with lidarseg indices), attributes, visibility."""

from __future__ import annotations

import hashlib

# (name, lidarseg index, description)
CATEGORY_TABLE = [
    ("noise", 0, "Points that carry no meaning: reflections, rain, sensor artefacts."),
    ("animal", 1, "Any animal on or near the road."),
    ("human.pedestrian.adult", 2, "An adult pedestrian walking, standing or sitting."),
    ("human.pedestrian.child", 3, "A child pedestrian."),
    ("human.pedestrian.construction_worker", 4, "A person working in a construction zone."),
    ("human.pedestrian.personal_mobility", 5, "A person on a scooter, skateboard or similar."),
    ("human.pedestrian.police_officer", 6, "A police officer."),
    ("human.pedestrian.stroller", 7, "A stroller or pram."),
    ("human.pedestrian.wheelchair", 8, "A wheelchair."),
    ("movable_object.barrier", 9, "A temporary barrier that keeps traffic out of an area."),
    ("movable_object.debris", 10, "Debris or movable objects on the road."),
    ("movable_object.pushable_pullable", 11, "Objects a pedestrian pushes or pulls, such as carts."),
    ("movable_object.trafficcone", 12, "A traffic cone."),
    ("static_object.bicycle_rack", 13, "An area or frame where bicycles are parked."),
    ("vehicle.bicycle", 14, "A bicycle, with or without a rider."),
    ("vehicle.bus.bendy", 15, "An articulated bus."),
    ("vehicle.bus.rigid", 16, "A rigid bus."),
    ("vehicle.car", 17, "A passenger car, van or small utility vehicle."),
    ("vehicle.construction", 18, "A vehicle for construction work: excavator, crane, bulldozer."),
    ("vehicle.emergency.ambulance", 19, "An ambulance."),
    ("vehicle.emergency.police", 20, "A police vehicle."),
    ("vehicle.motorcycle", 21, "A motorcycle or scooter, with or without a rider."),
    ("vehicle.trailer", 22, "A trailer towed or parked."),
    ("vehicle.truck", 23, "A truck for goods."),
    ("flat.driveable_surface", 24, "Surface a car can drive on."),
    ("flat.other", 25, "Other flat horizontal surfaces."),
    ("flat.sidewalk", 26, "Sidewalks and footpaths."),
    ("flat.terrain", 27, "Grass, soil and other natural ground."),
    ("static.manmade", 28, "Buildings, walls, poles, signs and other structures."),
    ("static.other", 29, "Other static background."),
    ("static.vegetation", 30, "Trees, bushes and other plants."),
    ("vehicle.ego", 31, "The ego vehicle itself."),
]

ATTRIBUTE_TABLE = [
    ("vehicle.moving", "The vehicle is moving."),
    ("vehicle.stopped", "The vehicle has a driver and is stopped, e.g. at a light."),
    ("vehicle.parked", "The vehicle is parked with no driver about to drive it."),
    ("cycle.with_rider", "A rider is on the bicycle or motorcycle."),
    ("cycle.without_rider", "Nobody rides the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The pedestrian sits or lies down."),
    ("pedestrian.standing", "The pedestrian stands."),
    ("pedestrian.moving", "The pedestrian walks or runs."),
]

VISIBILITY_TABLE = [
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
]


def visibility_token(fraction: float) -> str:
    """The visibility table token for a visible fraction in [0, 1]."""
    if fraction < 0.4:
        return "1"
    if fraction < 0.6:
        return "2"
    if fraction < 0.8:
        return "3"
    return "4"


def token(*parts) -> str:
    """A 32-hex-digit token, stable for its parts (as nuScenes tokens look)."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()
