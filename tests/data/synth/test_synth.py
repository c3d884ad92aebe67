"""The synthetic world as a nuScenes-format dataset: tables, files, geometry, determinism, safety."""

import json

import numpy as np
import pytest
from PIL import Image

from bevkit.data.nuscenes import CATEGORY_TO_CLASS, DETECTION_CLASSES, NuScenesTables
from bevkit.data.synth import render, writer
from bevkit.data.synth.city import G_WHITE, G_YELLOW, build_city
from bevkit.data.synth.occupancy import OCC_SHAPE
from bevkit.data.synth.schema import ATTRIBUTE_TABLE, CATEGORY_TABLE, token
from bevkit.geometry import apply, inverse


@pytest.fixture(scope="module")
def db(tiny_root):
    return NuScenesTables(tiny_root)


def _job(root, name):
    return next(j for j in writer.scene_jobs(root, "tiny") if j.name == name)


def test_layout_and_splits(tiny_root):
    version = tiny_root / "v1.0-mini"
    for table in ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
                  "log", "scene", "sample", "sample_data", "sample_annotation", "map"):
        rows = json.loads((version / f"{table}.json").read_text())
        assert rows, table
    splits = json.loads((version / "splits.json").read_text())
    assert splits == {"mini_train": ["scene-0061"], "mini_val": ["scene-0103"]}
    assert (tiny_root / "maps" / "expansion" / "boston-seaport.json").is_file()
    assert (tiny_root / "maps" / "expansion" / "singapore-onenorth.json").is_file()


def test_foreign_keys_and_chains(db):
    t = db.tables
    for ann in t["sample_annotation"]:
        db.get("sample", ann["sample_token"])
        db.get("instance", ann["instance_token"])
        db.get("visibility", ann["visibility_token"])
        assert len(ann["attribute_tokens"]) <= 1
        for a in ann["attribute_tokens"]:
            db.get("attribute", a)
        for key, back in (("next", "prev"), ("prev", "next")):
            if ann[key]:
                assert db.get("sample_annotation", ann[key])[back] == ann["token"]
    for inst in t["instance"]:
        anns = [a for a in t["sample_annotation"] if a["instance_token"] == inst["token"]]
        assert inst["nbr_annotations"] == len(anns)
        assert db.get("sample_annotation", inst["first_annotation_token"])["prev"] == ""
        assert db.get("sample_annotation", inst["last_annotation_token"])["next"] == ""
    for sd in t["sample_data"]:
        db.get("ego_pose", sd["ego_pose_token"])
        db.get("calibrated_sensor", sd["calibrated_sensor_token"])
        db.get("sample", sd["sample_token"])
        if sd["next"]:
            nxt = db.get("sample_data", sd["next"])
            assert nxt["prev"] == sd["token"] and nxt["timestamp"] > sd["timestamp"]
    for scene in t["scene"]:
        s = db.get("sample", scene["first_sample_token"])
        n = 1
        while s["next"]:
            nxt = db.get("sample", s["next"])
            assert nxt["prev"] == s["token"] and nxt["timestamp"] == s["timestamp"] + 500_000
            s, n = nxt, n + 1
        assert s["token"] == scene["last_sample_token"] and n == scene["nbr_samples"]
    assert {c["name"] for c in t["category"]} == {n for n, _, _ in CATEGORY_TABLE}
    assert {a["name"] for a in t["attribute"]} == {n for n, _ in ATTRIBUTE_TABLE}
    for q in [p["rotation"] for p in t["ego_pose"]] + [a["rotation"] for a in t["sample_annotation"]]:
        assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-9)


def test_every_detection_class_in_val_with_lidar_points(db):
    val = {s["token"] for s in db.tables["scene"] if s["name"] == "scene-0103"}
    seen = set()
    for ann in db.tables["sample_annotation"]:
        if db.get("sample", ann["sample_token"])["scene_token"] in val and ann["num_lidar_pts"] > 0:
            seen.add(CATEGORY_TO_CLASS.get(db.category(ann)))
    assert set(DETECTION_CLASSES) <= seen


def test_files_have_the_real_formats(db, tiny_root):
    for sd in db.tables["sample_data"]:
        path = tiny_root / sd["filename"]
        assert path.is_file(), sd["filename"]
        if sd["fileformat"] == "jpg":
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (sd["width"], sd["height"])
        else:
            raw = np.fromfile(path, dtype=np.float32)
            assert raw.size % 5 == 0
            pts = raw.reshape(-1, 5)
            assert len(pts) > 15_000
            assert set(np.unique(pts[:, 4]).astype(int)) <= set(range(32))
            assert pts[:, 3].min() >= 0 and pts[:, 3].max() <= 255
            assert np.linalg.norm(pts[:, :3], axis=1).max() <= 100.5
    for scene in db.tables["scene"]:
        for s in db.tables["sample"]:
            if s["scene_token"] != scene["token"]:
                continue
            with np.load(tiny_root / "gts" / scene["name"] / s["token"] / "labels.npz") as z:
                assert set(z.files) == {"semantics", "mask_lidar", "mask_camera"}
                for key in z.files:
                    assert z[key].shape == OCC_SHAPE and z[key].dtype == np.uint8
                assert z["semantics"].max() <= 17
                assert set(np.unique(z["mask_camera"])) <= {0, 1}


def test_num_lidar_pts_counts_points_in_the_box(db, tiny_root):
    for sample in db.samples[::3]:
        sd = db.keyframe(sample, "LIDAR_TOP")
        pts = np.fromfile(tiny_root / sd["filename"], dtype=np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
        ego = apply(db.ego_from_sensor(sd), pts)
        boxes, _ = db.boxes_ego(sample)
        for box, ann in zip(boxes, db.annotations(sample)):
            inside = render.points_in_box(ego, box[:3], box[6], box[3:6])
            assert inside.sum() == ann["num_lidar_pts"]


def _rebuild(tiny_root, db, sample):
    """The world behind a sample: city, scenario, simulation step and the primitives then."""
    scene = db.get("scene", sample["scene_token"])
    job = _job(tiny_root, scene["name"])
    city, scn = writer.scene_world(job)
    step = int(round((sample["timestamp"] - job.start_us) / 1e6 / 0.05))
    prims = render.scene_prims(scn, step, (scn.ego_x[step], scn.ego_y[step]), 200.0, {})
    return job, city, scn, step, prims


def test_lidar_ranges_equal_the_geometry_hit(db, tiny_root):
    sample = db.samples[-2]
    _, city, scn, step, prims = _rebuild(tiny_root, db, sample)
    sd = db.keyframe(sample, "LIDAR_TOP")
    city_from_lidar = inverse(city.global_from_city) @ db.global_from_ego(sd) @ db.ego_from_sensor(sd)
    pts = np.fromfile(tiny_root / sd["filename"], dtype=np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
    rng_ = np.linalg.norm(pts, axis=1)
    dirs = pts / rng_[:, None]
    rays = render.RaySet(dirs, np.array([[1.0, 0.0, 0.0]]), np.array([np.pi]), [np.arange(len(dirs))])
    hits, _ = render.cast(prims, city_from_lidar[:3, 3], rays, city_from_lidar[:3, :3], max_range=150.0)
    err = np.abs(hits.t - rng_)
    assert np.mean(err < 0.08) > 0.995, np.percentile(err, [50, 99, 99.9])

    # Points inside an annotated box lie on that object's own surfaces.
    job = _job(tiny_root, db.get("scene", sample["scene_token"])["name"])
    agent_of = {token(job.seed, "instance", job.name, a.id): a.id for a in scn.agents}
    boxes, _ = db.boxes_ego(sample)
    ego = apply(db.ego_from_sensor(sd), pts)
    checked = 0
    for box, ann in zip(boxes, db.annotations(sample)):
        inside = render.points_in_box(ego, box[:3], box[6], box[3:6])
        if inside.sum() < 5:
            continue
        mine = prims.owner == agent_of[ann["instance_token"]]
        own = render.Prims(*[getattr(prims, f)[mine] for f in
                             ("kind", "center", "size", "yaw", "color", "material", "owner", "occ")])
        sub = render.RaySet(dirs[inside], rays.tile_dir, rays.tile_half, [np.arange(inside.sum())])
        h, _ = render.cast(own, city_from_lidar[:3, 3], sub, city_from_lidar[:3, :3], max_range=150.0)
        assert np.mean(np.abs(h.t - rng_[inside]) < 0.08) > 0.95
        checked += 1
    assert checked >= 5


def test_scenario_is_deterministic_for_a_seed():
    from bevkit.data.synth.agents import make_scenario

    city = build_city("boston-seaport", 3)
    a = make_scenario(city, 3, 7, 4.0)
    b = make_scenario(city, 3, 7, 4.0)
    np.testing.assert_array_equal(a.ego_x, b.ego_x)
    assert [x.category for x in a.agents] == [x.category for x in b.agents]
    np.testing.assert_array_equal(np.stack([x.x for x in a.agents]), np.stack([x.x for x in b.agents]))
    c = make_scenario(city, 4, 7, 4.0)
    assert not np.array_equal(a.ego_x, c.ego_x)


def test_scene_files_are_byte_identical_across_runs(tmp_path):
    job = writer.SceneJob(str(tmp_path / "a"), 5, 0, "scene-0061", "singapore-onenorth", "mini_train", 2, 0.1, 2,
                          1_535_000_000_000_000)
    ra = writer.generate_scene(job)
    rb = writer.generate_scene(writer.SceneJob(**{**job.__dict__, "out": str(tmp_path / "b")}))
    assert ra == rb
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_pool_workers_write_the_same_bytes_single_threaded(tmp_path):
    """Scenes rendered in the worker pool (one BLAS thread each) equal the in-process render,
    and the parent's thread settings are left as they were."""
    import os

    job = writer.SceneJob(str(tmp_path / "pool"), 5, 0, "scene-0061", "singapore-onenorth", "mini_train", 2, 0.1, 2,
                          1_535_000_000_000_000)
    other = writer.SceneJob(**{**job.__dict__, "index": 1, "name": "scene-0103"})
    before = {k: os.environ.get(k) for k in writer._SINGLE_THREAD_ENV}
    pooled = writer._run_jobs([job, other], workers=2, progress=False, lidar_hz=2)
    assert {k: os.environ.get(k) for k in writer._SINGLE_THREAD_ENV} == before
    local = writer.generate_scene(writer.SceneJob(**{**job.__dict__, "out": str(tmp_path / "local")}))
    assert pooled[0] == local
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert files
    for f in files:
        assert (tmp_path / "pool" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f


def test_map_dividers_lie_on_painted_lines(tiny_root):
    city = build_city("boston-seaport", 0)
    m = json.loads((tiny_root / "maps" / "expansion" / "boston-seaport.json").read_text())
    nodes = {n["token"]: (n["x"], n["y"]) for n in m["node"]}
    lines = {ln["token"]: ln["node_tokens"] for ln in m["line"]}
    city_from_global = inverse(city.global_from_city)
    on_paint = []
    for rec in m["road_divider"] + m["lane_divider"]:
        a, b = (np.array(nodes[t]) for t in lines[rec["line_token"]])
        d = (b - a) / np.linalg.norm(b - a)
        normal = city_from_global[:2, :2] @ np.array([-d[1], d[0]])
        for f in np.linspace(0.05, 0.95, 7):
            x, y, _ = apply(city_from_global, np.append(a + f * (b - a), 0.0))
            # Road dividers are double lines: probe both strokes, 0.12 m either side of the centre.
            probes = np.array([[x + s * normal[0], y + s * normal[1]] for s in (-0.12, 0.0, 0.12)])
            codes = city.ground_at(probes[:, 0], probes[:, 1])
            on_paint.append(bool(np.isin(codes, (G_WHITE, G_YELLOW)).any()))
    # Dashed lane dividers are painted a third of their length, solid lines all of it.
    assert np.mean(on_paint) > 0.6
    assert m["version"] == "1.3" and len(m["canvas_edge"]) == 2


def test_occupancy_marks_annotated_objects(db, tiny_root):
    sample = db.samples[2]
    scene = db.get("scene", sample["scene_token"])
    with np.load(tiny_root / "gts" / scene["name"] / sample["token"] / "labels.npz") as z:
        sem, cam, lid = z["semantics"], z["mask_camera"], z["mask_lidar"]
    occ_class = {"car": 4, "pedestrian": 7, "truck": 10, "bus": 3, "traffic_cone": 8, "barrier": 1}
    boxes, names = db.boxes_ego(sample)
    hits = total = 0
    for box, name in zip(boxes, names):
        cls = CATEGORY_TO_CLASS.get(name)
        if cls not in occ_class or np.abs(box[:2]).max() > 39:
            continue
        i, j, k = ((np.array(box[:3]) - [-40, -40, -1]) / 0.4).astype(int)
        total += 1
        hits += int(np.any(sem[i - 1 : i + 2, j - 1 : j + 2, max(k - 1, 0) : k + 2] == occ_class[cls]))
    assert total >= 5 and hits / total > 0.9
    ground = sem[:, :, 2]
    assert {11, 13, 14} <= set(np.unique(ground).tolist())
    assert (sem == 17).mean() > 0.5
    # The road 10-20 m ahead is seen (unless a vehicle stands on it); the sky above 3 m far off
    # and what lies behind buildings are not.
    assert cam[125:150, 95:105, 2].mean() > 0.5
    assert 0.05 < cam.mean() < 0.9
    assert 0.05 < lid.mean() < 0.95


def test_refuses_non_empty_out(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        writer.generate(out, preset="tiny", workers=1, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "data"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "_write_tables", boom)
    with pytest.raises(RuntimeError):
        writer.generate(out, preset="tiny", workers=1, progress=False, samples=2, scale=0.1, lidar_hz=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(writer, "_write_tables", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        writer.generate(out, preset="tiny", workers=1, progress=False, samples=2, scale=0.1, lidar_hz=2,
                        overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_dataset_folder_follows_the_umask_and_replaces_a_plain_file(tmp_path):
    import os
    import stat

    out = tmp_path / "data"
    out.write_text("a file in the way")
    old = os.umask(0o022)
    try:
        writer.generate(out, preset="tiny", workers=1, progress=False, samples=2, scale=0.1, lidar_hz=2,
                        overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # readable by others, as mkdir makes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing left beside it


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="huge"), "unknown preset"),
    (dict(preset="tiny", scale=2.0), "image scale"),
    (dict(preset="tiny", lidar_hz=7), "lidar rate"),
    (dict(preset="tiny", samples=1), "at least 2 samples"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        writer.generate(tmp_path / "x", workers=1, progress=False, **kwargs)
    assert not (tmp_path / "x").exists()
