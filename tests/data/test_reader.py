"""The reader: the versioned index, samples, augmentation, map targets and check-data."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from bevkit.cli import main
from bevkit.data.augment import BEVAugConfig, ImageAugConfig, image_aug_matrix, warp_image
from bevkit.data.check import check_dataset
from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.data.maps import MAP_CLASSES
from bevkit.data.nuscenes import DataError, NuScenesIndex
from bevkit.data.synth import render
from bevkit.geometry import apply, inverse, project
from bevkit.geometry.grid import BEVGrid


@pytest.fixture(scope="module")
def index(tiny_root, tmp_path_factory):
    return NuScenesIndex.load(tiny_root, cache_dir=tmp_path_factory.mktemp("cache"))


def test_index_is_cached_and_rebuilt_when_stale(tiny_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    cache = tmp_path / "cache"
    a = NuScenesIndex.load(data, cache_dir=cache)
    files = list((cache / "index").glob("*.npz"))
    assert len(files) == 1 and not files[0].name.startswith(".")
    stamp = files[0].stat().st_mtime_ns
    b = NuScenesIndex.load(data, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp and b.identity == a.identity  # reused, not rebuilt
    # A changed table is a different dataset: a new index, never the stale one.
    rows = json.loads((data / "v1.0-mini" / "sample_annotation.json").read_text())
    rows[0]["translation"][0] += 1.0
    (data / "v1.0-mini" / "sample_annotation.json").write_text(json.dumps(rows))
    c = NuScenesIndex.load(data, cache_dir=cache)
    assert c.identity != a.identity
    tok = rows[0]["sample_token"]
    k = c.sample(tok)["anns"]["token"].index(rows[0]["token"])
    k0 = a.sample(tok)["anns"]["token"].index(rows[0]["token"])
    assert c.sample(tok)["anns"]["boxes"][k] != a.sample(tok)["anns"]["boxes"][k0]
    # An edit in the middle of a table that keeps its size and modification time (as tar, rsync -a or
    # cp -p keep times) is a different dataset too.
    table = data / "v1.0-mini" / "sample_annotation.json"
    raw, st = table.read_bytes(), table.stat()
    at = raw.index(b'"translation"', len(raw) // 2)
    at = raw.index(b".", at) + 1  # a decimal digit inside a coordinate
    digit = raw[at:at + 1]
    table.write_bytes(raw[:at] + (b"1" if digit != b"1" else b"2") + raw[at + 1:])
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert table.stat().st_size == st.st_size and table.stat().st_mtime_ns == st.st_mtime_ns
    assert NuScenesIndex.load(data, cache_dir=cache).identity != c.identity
    table.write_bytes(raw)
    # A copy of the dataset (new files, new times) keeps its identity.
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, copy_function=shutil.copyfile)
    assert NuScenesIndex.load(copy, cache_dir=cache).identity == c.identity
    # A foreign or corrupt file under the right name is rebuilt, not trusted.
    path = cache / "index" / f"v1.0-mini-{c.identity}.npz"
    header = json.dumps({"schema": 999, "identity": c.identity}).encode()
    with open(path, "wb") as f:
        np.savez(f, header=np.frombuffer(header, dtype=np.uint8))
    assert len(NuScenesIndex.load(data, cache_dir=cache).samples) == 12
    path.write_text("{not an npz")
    assert len(NuScenesIndex.load(data, cache_dir=cache).samples) == 12
    with open(path, "wb") as f:  # the right header, arrays missing
        np.savez(f, header=np.frombuffer(json.dumps({"schema": 2, "identity": c.identity}).encode(), dtype=np.uint8))
    assert len(NuScenesIndex.load(data, cache_dir=cache).samples) == 12


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["sample_data"][3].update(ego_pose_token="f" * 32),
     f"ego_pose.json: no record with token {'f' * 32!r}"),
    (lambda t: t["sample_annotation"][5].update(translation=[1.0, 2.0]),
     "sample_annotation.json: Expected `array` of length 3 - at `$[5].translation`"),
    (lambda t: t["sample"][0].update(timestamp="soon"), "sample.json: Expected `int`, got `str` - at `$[0].timestamp`"),
    (lambda t: t["instance"][2].update(category_token="nope"), "category.json: no record with token 'nope'"),
    (lambda t: t["calibrated_sensor"][1].update(camera_intrinsic=[[1.0, 0.0], [0.0, 1.0]]),
     "camera_intrinsic must be 3x3 or empty, got shape (2, 2)"),
])
def test_index_build_names_bad_records(tiny_root, tmp_path, edit, message):
    """A dangling token or a mistyped field stops the build with the file, record and field."""
    shutil.copytree(tiny_root / "v1.0-mini", tmp_path / "v1.0-mini")
    tables = {}
    for name in ("sample_data", "sample_annotation", "sample", "instance", "calibrated_sensor"):
        tables[name] = json.loads((tmp_path / "v1.0-mini" / f"{name}.json").read_text())
    edit(tables)
    for name, rows in tables.items():
        (tmp_path / "v1.0-mini" / f"{name}.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as e:
        NuScenesIndex.load(tmp_path, cache_dir=tmp_path / "cache")
    assert message in str(e.value)
    for name in tables:
        shutil.copy(tiny_root / "v1.0-mini" / f"{name}.json", tmp_path / "v1.0-mini" / f"{name}.json")
    assert len(NuScenesIndex.load(tmp_path, cache_dir=tmp_path / "cache").samples) == 12
    (tmp_path / "v1.0-mini" / "scene.json").write_text("[{")
    with pytest.raises(DataError, match="scene.json: not valid JSON"):
        NuScenesIndex.load(tmp_path, cache_dir=tmp_path / "cache")


def test_samples_are_made_once_and_index_like_a_list(index):
    n = len(index.samples)
    assert index.samples[-1] is index.samples[n - 1]  # made once, then the same dict
    assert index.samples[1:4] == [index.samples[k] for k in (1, 2, 3)]
    assert [s["token"] for s in index.samples] == [s["token"] for s in index.samples[:]]
    with pytest.raises(IndexError):
        index.samples[n]
    s = index.sample(index.samples[2]["token"])
    assert s is index.samples[2] and len(s["anns"]["boxes"]) == len(s["anns"]["token"]) > 0


def test_table_boxes_equal_the_index_boxes_with_unknown_velocities_unknown(tiny_root, index):
    from bevkit.data.nuscenes import NuScenesTables

    tables = NuScenesTables(tiny_root, "v1.0-mini")
    unknown = 0
    for s in index.samples:
        boxes, _ = tables.boxes_ego(tables.index["sample"][s["token"]])
        ref = np.array([[np.nan if v is None else v for v in b] for b in s["anns"]["boxes"]], float).reshape(-1, 9)
        np.testing.assert_allclose(boxes, ref, rtol=0, atol=1e-9)  # NaN in the same places
        unknown += int(np.isnan(ref[:, 7]).sum())
    assert unknown > 0  # the case occurs: annotations without a neighbour


def test_a_sweep_cut_inside_a_point_is_refused(tmp_path):
    from bevkit.data.dataset import read_points

    pts = np.arange(4000, dtype=np.float32)
    for size, ok in ((160, True), (163, False), (12345, False), (0, True)):
        path = tmp_path / f"{size}.pcd.bin"
        path.write_bytes(pts.tobytes()[:size])
        if ok:
            assert read_points(path).shape == (size // 20, 5)
        else:
            with pytest.raises(DataError, match=f"{size} bytes is not a whole number of 5-float points"):
                read_points(path)
    with pytest.raises(DataError, match="cannot read LiDAR points"):
        read_points(tmp_path / "absent.pcd.bin")


def test_splits(index):
    assert [index.scenes[s["scene_token"]]["name"] for s in index.split("mini_val")] == ["scene-0103"] * 6
    assert len(index.split("mini_train")) == 6


def test_dataset_items_and_loader(tiny_root, index):
    grid = BEVGrid(xmin=-30, xmax=30, ymin=-15, ymax=15, dx=0.5, dy=0.5)
    cfg = DataConfig(image_size=(96, 256), sweeps=2, map_grid=grid, occupancy=True,
                     img_aug=ImageAugConfig(final_size=(96, 256)), bev_aug=BEVAugConfig())
    ds = NuScenesDataset(tiny_root, "mini_val", cfg, index=index)
    item = ds[1]
    assert item["images"].shape == (6, 3, 96, 256) and item["images"].dtype == torch.uint8
    assert item["intrinsics"].shape == (6, 3, 3) and item["ego_from_cam"].shape == (6, 4, 4)
    assert item["boxes"].shape[1] == 9 and len(item["labels"]) == len(item["boxes"]) == len(item["attributes"])
    assert item["map"].shape == (len(MAP_CLASSES), 60, 120)
    assert item["occupancy"].shape == (200, 200, 16)
    dt = item["points"][:, 4]
    assert dt.min() == 0 and 0.05 < dt.max() <= 0.25  # the keyframe and two sweeps at 10 Hz
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["images"].shape == (2, 6, 3, 96, 256) and len(batch["boxes"]) == 2
    # Augmentation is a function of (seed, epoch, index): the same with or without workers.
    torch.testing.assert_close(batch["bev_aug"][1], ds[1]["bev_aug"])


def test_image_augmentation_is_exact(tiny_root, index):
    """Box centres projected through the augmented camera land on the same pixels of the object."""
    from PIL import Image

    s = index.split("mini_val")[3]
    rng = np.random.default_rng(0)
    cfg = ImageAugConfig(final_size=(160, 400), rotate=(-10, 10), flip=True)
    diffs, wrong = [], []
    boxes = np.array([[np.nan if v is None else v for v in b] for b in s["anns"]["boxes"]])
    for ch, cam in s["cams"].items():
        img = torch.from_numpy(np.array(Image.open(tiny_root / cam["filename"]).convert("RGB"))).permute(2, 0, 1)
        aug = image_aug_matrix(img.shape[-2:], cfg, rng)
        out = warp_image(img, aug, cfg.final_size).float()
        k = np.array(cam["intrinsics"])
        cam_from_ego = inverse(np.array(cam["ego_from_cam"]))
        for box, vis in zip(boxes, s["anns"]["visibility"]):
            c = apply(cam_from_ego, box[:3])
            if vis != "4" or c[2] < 2:
                continue
            uv, _ = project(k, c[None])
            uva = (aug @ np.append(uv[0], 1.0))[:2]
            if not (2 <= uva[0] < cfg.final_size[1] - 2 and 2 <= uva[1] < cfg.final_size[0] - 2):
                continue
            if not (0 <= uv[0, 0] < img.shape[2] and 0 <= uv[0, 1] < img.shape[1]):
                continue
            orig = img[:, int(round(uv[0, 1])), int(round(uv[0, 0]))].float()
            got = out[:, int(round(uva[1])), int(round(uva[0]))]
            diffs.append((orig - got).abs().mean().item())
            # A matrix off by 30 pixels must not agree as well: the check can fail.
            off = out[:, int(round(uva[1])), int(round(uva[0] + 30)) % cfg.final_size[1]]
            wrong.append((orig - off).abs().mean().item())
    assert len(diffs) >= 5
    assert np.median(diffs) < 12 and np.median(wrong) > 2 * np.median(diffs)


def test_bev_augmentation_keeps_points_in_their_boxes(tiny_root, index):
    plain = NuScenesDataset(tiny_root, "mini_val", DataConfig(image_size=(64, 176)), index=index)[2]
    auged = NuScenesDataset(tiny_root, "mini_val", DataConfig(image_size=(64, 176), bev_aug=BEVAugConfig(
        rotate=(-40, 40), scale=(0.9, 1.1))), index=index, seed=3)[2]
    assert not torch.allclose(auged["bev_aug"], torch.eye(4))
    checked = 0
    for b0, b1 in zip(plain["boxes"].double().numpy(), auged["boxes"].double().numpy()):
        n0 = render.points_in_box(plain["points"][:, :3].double().numpy(), b0[:3], b0[6], b0[3:6])
        n1 = render.points_in_box(auged["points"][:, :3].double().numpy(), b1[:3], b1[6], b1[3:6])
        assert (n0 == n1).all()
        checked += int(n0.sum() > 0)
    assert checked >= 10


def test_bev_augmentation_moves_velocities_map_and_occupancy_with_the_boxes(tiny_root, index):
    """Checked against quantities the augmentation code does not produce itself: velocity relative to the
    box heading, the plain map resampled cell by cell, and occupied car voxels against the moved boxes."""
    from bevkit.eval.occupancy import OCC_CLASSES

    grid = BEVGrid(xmin=-30, xmax=30, ymin=-15, ymax=15, dx=0.25, dy=0.25)
    base = dict(image_size=(32, 88), map_grid=grid, occupancy=True, load_points=False)
    plain_ds = NuScenesDataset(tiny_root, "mini_val", DataConfig(**base), index=index)
    aug_ds = NuScenesDataset(tiny_root, "mini_val", DataConfig(**base, bev_aug=BEVAugConfig(
        rotate=(25, 40), scale=(0.9, 1.1), flip_x=0.0, flip_y=1.0)), index=index, seed=5)
    moving = 0
    for i in (1, 3):
        plain, auged = plain_ds[i], aug_ds[i]
        m = auged["bev_aug"].double().numpy()
        s = np.cbrt(abs(np.linalg.det(m[:3, :3])))
        assert np.linalg.det(m[:2, :2]) < 0  # a rotation, a scale and a mirror
        # Velocities: speed scales with the map, the angle to the heading is kept (negated by the mirror).
        for b0, b1 in zip(plain["boxes"].double().numpy(), auged["boxes"].double().numpy()):
            if not np.isfinite(b0[7]) or np.hypot(b0[7], b0[8]) < 0.5:
                continue
            moving += 1
            assert np.hypot(b1[7], b1[8]) == pytest.approx(s * np.hypot(b0[7], b0[8]), rel=1e-4)
            rel0 = np.arctan2(b0[8], b0[7]) - b0[6]
            rel1 = np.arctan2(b1[8], b1[7]) - b1[6]
            assert np.cos(rel1) == pytest.approx(np.cos(rel0), abs=1e-4)
            assert np.sin(rel1) == pytest.approx(-np.sin(rel0), abs=1e-4)
        # Map: the augmented raster equals the plain one looked up at each cell's source position.
        xs, ys = grid.centres()
        xx, yy = np.meshgrid(xs, ys)
        inv = np.linalg.inv(m)
        sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 3]
        sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 3]
        ix, iy = np.floor((sx - grid.xmin) / grid.dx).astype(int), np.floor((sy - grid.ymin) / grid.dy).astype(int)
        ok = (ix >= 0) & (ix < grid.nx) & (iy >= 0) & (iy < grid.ny)
        ref = np.zeros_like(plain["map"].numpy())
        ref[:, ok] = plain["map"].numpy()[:, iy[ok], ix[ok]]

        def near(a):  # cells within two cells (0.5 m) of a marked cell: lines two cells wide sit half a cell
            # off their centre line, and the lookup rounds to the nearest cell once more
            return torch.nn.functional.max_pool2d(torch.from_numpy(a).float()[:, None], 5, 1, 2)[:, 0].numpy() > 0

        def agreement(a, b):  # per class: the share of the marked cells of each that the other marks nearby
            a, b = a.astype(bool) & ok, b.astype(bool) & ok
            return np.minimum((a & near(b)).sum((1, 2)) / a.sum((1, 2)), (b & near(a)).sum((1, 2)) / b.sum((1, 2)))

        moved = agreement(ref, auged["map"].numpy())
        unmoved = agreement(ref, plain["map"].numpy())  # what a map left out of the augmentation would give
        assert (moved > 0.97).all() and (unmoved[:3] < 0.5).all() and unmoved[3] < 0.9
        # Occupancy: voxels labelled car lie in the moved car boxes as they lay in the original ones.
        car = OCC_CLASSES.index("car")
        for item in (plain, auged):
            vox = np.argwhere(item["occupancy"].numpy() == car)
            assert len(vox) > 50
            centres = (vox + 0.5) * 0.4 + np.array([-40.0, -40.0, -1.0])
            boxes = item["boxes"].double().numpy()
            cars = boxes[item["labels"].numpy() == aug_ds.class_index["car"]]
            inside = np.zeros(len(centres), bool)
            for b in cars:  # with a margin of one voxel diagonal for the voxelisation
                inside |= render.points_in_box(centres, b[:3], b[6], b[3:6] + 0.7)
            assert inside.mean() > 0.9
    assert moving >= 3


def test_divider_cells_fall_on_painted_markings(tiny_root, index):
    from PIL import Image

    grid = BEVGrid(xmin=4, xmax=30, ymin=-13, ymax=13, dx=0.1, dy=0.1)
    ds = NuScenesDataset(tiny_root, "mini_val", DataConfig(image_size=(64, 176), map_grid=grid, load_points=False,
                                                           map_line_width=0.1), index=index)
    on, off = [], []
    for i in range(len(ds)):
        item = ds[i]
        s = ds.samples[i]
        cam = s["cams"]["CAM_FRONT"]
        img = np.asarray(Image.open(tiny_root / cam["filename"]).convert("RGB")).astype(float)
        xs, ys = grid.centres()
        xx, yy = np.meshgrid(xs, ys)
        pts = np.stack([xx, yy, np.zeros_like(xx)], -1)
        uv, z = project(np.array(cam["intrinsics"]), apply(inverse(np.array(cam["ego_from_cam"])), pts))
        inside = (z > 1) & (uv[..., 0] >= 0) & (uv[..., 0] < img.shape[1] - 1) & (uv[..., 1] >= 0) & (
            uv[..., 1] < img.shape[0] - 1)
        div = item["map"][0].numpy().astype(bool)
        lines = div | item["map"][1].numpy().astype(bool) | item["map"][2].numpy().astype(bool)
        # Bare road: drivable cells at least 1 m from any line.
        near = torch.nn.functional.max_pool2d(torch.from_numpy(lines.astype(np.float32))[None], 21, 1, 10)[0]
        road = item["map"][3].numpy().astype(bool) & (near.numpy() == 0) & inside
        # Brightest pixel around each cell: a double line's centre lies between its two strokes.
        bright = torch.nn.functional.max_pool2d(torch.from_numpy(img.max(axis=2))[None], 3, 1, 1)[0].numpy()
        for mask, acc in ((div & inside, on), (road, off)):
            px = np.round(uv[mask]).astype(int)
            acc.extend(bright[px[:, 1], px[:, 0]])
    # Painted lines (white or yellow) are bright, the bare road is not. Dashed lane lines are painted
    # a third of their length and vehicles hide some lines, so compare how often each is bright.
    on, off = np.array(on), np.array(off)
    assert len(on) > 100
    bright_on, bright_off = np.mean(on > 150), np.mean(off > 150)
    assert bright_on > 0.3 and bright_on > 4 * bright_off, (bright_on, bright_off)


def test_check_data_clean_and_broken(tiny_root, tmp_path, capsys):
    rep = check_dataset(tiny_root)
    assert rep.problems == [] and rep.summary["samples"] == 12
    assert main(["check-data", str(tiny_root)]) == 0
    capsys.readouterr()

    def broken(name, damage):
        root = tmp_path / name
        shutil.copytree(tiny_root, root)
        damage(root)
        code = main(["check-data", str(root)])
        out, err = capsys.readouterr()
        assert code != 0 and "Traceback" not in err
        return err

    def drop_image(root):
        sd = next(r for r in json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
                  if r["fileformat"] == "jpg")
        os.remove(root / sd["filename"])
        drop_image.name = sd["filename"]

    err = broken("image", drop_image)
    assert drop_image.name in err and "file is missing" in err

    def truncate(root):
        sd = next(r for r in json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
                  if r["filename"].endswith(".pcd.bin"))
        path = root / sd["filename"]
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 7)
        truncate.token = sd["token"]

    err = broken("pcd", truncate)
    assert truncate.token in err and "truncated" in err

    def dangling(root):
        p = root / "v1.0-mini" / "sample_annotation.json"
        rows = json.loads(p.read_text())
        rows[5]["sample_token"] = "0" * 32
        dangling.token = rows[5]["token"]
        p.write_text(json.dumps(rows))

    err = broken("dangling", dangling)
    assert dangling.token in err and "sample_token" in err and "does not exist" in err

    def malformed(root):
        (root / "v1.0-mini" / "scene.json").write_text('[{"token": "x", ')

    err = broken("malformed", malformed)
    assert "scene.json" in err and "not valid JSON" in err


def test_a_dropped_index_is_freed_at_once(tiny_root, tmp_path):
    # No reference cycle: the cyclic collector is not needed to free an index and its arrays.
    import gc
    import weakref

    index = NuScenesIndex.load(tiny_root, cache_dir=tmp_path)
    assert index.samples[0]["token"] == index.samples[:1][0]["token"]
    ref = weakref.ref(index)
    gc.disable()
    try:
        del index
        assert ref() is None
    finally:
        gc.enable()


def test_boxes_without_points_are_left_out_on_request(tiny_root, tmp_path):
    """``drop_empty_boxes`` (training's default, through ``train.drop_empty_boxes``) leaves out exactly the
    annotations with no LiDAR and no radar point: an annotation with radar returns only is kept."""
    from bevkit.config import ExperimentConfig
    from bevkit.data.nuscenes import CATEGORY_TO_CLASS
    from bevkit.engine.data import data_config

    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    table = data / "v1.0-mini" / "sample_annotation.json"
    anns = json.loads(table.read_text())
    index = NuScenesIndex.load(data, cache_dir=tmp_path / "cache")
    k, sample = next((k, s) for k, s in enumerate(index.split("mini_val"))
                     if sum(n == 0 and c in CATEGORY_TO_CLASS for n, c in
                            zip(s["anns"]["num_lidar_pts"], s["anns"]["category"])) >= 2)
    empty = [t for t, n, c in zip(sample["anns"]["token"], sample["anns"]["num_lidar_pts"], sample["anns"]["category"])
             if n == 0 and c in CATEGORY_TO_CLASS]
    radar_only = next(a for a in anns if a["token"] == empty[0])
    radar_only["num_radar_pts"] = 2
    table.write_text(json.dumps(anns))
    index = NuScenesIndex.load(data, cache_dir=tmp_path / "cache")  # rebuilt: the table changed
    sample = index.split("mini_val")[k]
    assert sample["anns"]["num_radar_pts"][sample["anns"]["token"].index(empty[0])] == 2
    every = NuScenesDataset(data, "mini_val", DataConfig(cameras=(), load_points=False), index=index)[k]
    kept = NuScenesDataset(data, "mini_val", DataConfig(cameras=(), load_points=False, drop_empty_boxes=True),
                           index=index)[k]
    gone = set(every["instances"]) - set(kept["instances"])
    instance = dict(zip(sample["anns"]["token"], sample["anns"]["instance"]))
    assert gone == {instance[t] for t in empty[1:]} and instance[empty[0]] in kept["instances"]
    assert len(every["boxes"]) - len(kept["boxes"]) == len(empty) - 1
    # Training drops them by default; validation and evaluation read every box.
    cfg = ExperimentConfig()
    assert data_config(cfg, train=True).drop_empty_boxes and not data_config(cfg, train=False).drop_empty_boxes
    assert not data_config(ExperimentConfig(train={"drop_empty_boxes": False}), train=True).drop_empty_boxes
