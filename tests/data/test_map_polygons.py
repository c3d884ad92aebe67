"""Map expansion edge cases: invalid polygons left out as the devkit leaves them; holes erase only their polygon."""

import json

import numpy as np

from bevkit.data.maps import MapLayers, rasterise
from bevkit.geometry.grid import BEVGrid


def _map(tmp_path, polygons: dict, layers: dict):
    nodes, polys = [], []
    for token, (exterior, holes) in polygons.items():
        ext = []
        for i, (x, y) in enumerate(exterior):
            nodes.append({"token": f"{token}-e{i}", "x": x, "y": y})
            ext.append(f"{token}-e{i}")
        hole_rows = []
        for j, hole in enumerate(holes):
            toks = []
            for i, (x, y) in enumerate(hole):
                nodes.append({"token": f"{token}-h{j}-{i}", "x": x, "y": y})
                toks.append(f"{token}-h{j}-{i}")
            hole_rows.append({"node_tokens": toks})
        polys.append({"token": token, "exterior_node_tokens": ext, "holes": hole_rows})
    doc = {"node": nodes, "polygon": polys, "line": [], **layers}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    return path


def test_invalid_polygons_are_left_out_and_holes_erase_only_their_polygon(tmp_path):
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    bowtie = [(0, 0), (10, 10), (10, 0), (0, 10)]  # self-intersecting
    ring = ([(-5, -5), (5, -5), (5, 5), (-5, 5)], [[(-2, -2), (2, -2), (2, 2), (-2, 2)]])
    path = _map(tmp_path, {"a": (square, []), "bow": (bowtie, []), "lane": ([(5, 0), (20, 0), (20, 5), (5, 5)], []),
                           "under": ([(-1, -1), (1, -1), (1, 1), (-1, 1)], []), "ring": ring},
                {"road_segment": [{"polygon_token": "a"}, {"polygon_token": "bow"}],
                 "lane": [{"polygon_token": "lane"}],
                 "drivable_area": [{"polygon_tokens": ["under", "ring", "bow"]}]})
    layers = MapLayers(path)  # a union with the bow-tie raised a GEOS TopologyException
    assert layers.invalid_polygons == 2  # the bow-tie, in the road and in the drivable area
    grid = BEVGrid(xmin=-8, xmax=8, ymin=-8, ymax=8, dx=0.5, dy=0.5)
    drivable = rasterise(layers, np.eye(4), grid, classes=("drivable",))[0]
    centre = drivable[grid.ny // 2 - 1: grid.ny // 2 + 1, grid.nx // 2 - 1: grid.nx // 2 + 1]
    assert centre.all()  # "under" stays drawn inside the ring's hole, drawn after it
    assert drivable[grid.ny // 2, grid.nx // 2 + 2] == 0  # the hole itself (x = 1.25 m) is not drivable
    assert drivable[grid.ny // 2, grid.nx // 2 + 8] == 1  # the ring (x = 4.25 m)
