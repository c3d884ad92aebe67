"""Write a synthetic world as a complete nuScenes-format dataset.

Layout (what the devkit and the BEV toolkits expect)::

    OUT/<version>/{13 tables}.json, splits.json
    OUT/samples/CAM_*/*.jpg, OUT/samples/LIDAR_TOP/*.pcd.bin, OUT/sweeps/LIDAR_TOP/*.pcd.bin
    OUT/maps/<token>.png, OUT/maps/expansion/<location>.json
    OUT/gts/<scene name>/<sample token>/labels.npz        (Occ3D layout)

Scenes are generated in parallel processes; the dataset is written into a temporary folder next
to OUT and renamed into place at the end, so an interrupted run never leaves a dataset that looks
complete.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bevkit.data.nuscenes import official_splits
from bevkit.data.synth import occupancy
from bevkit.data.synth.agents import CATEGORIES, DT, make_scenario
from bevkit.data.synth.city import build_city, stable_seed
from bevkit.data.synth.mapexp import build_map_json, drivable_mask_png
from bevkit.data.synth.render import (
    Hits,
    camera_rays,
    cast,
    cast_camera,
    lidar_intensity,
    lidar_rays,
    points_in_box,
    scene_prims,
    shade_camera,
)
from bevkit.data.synth.rig import CAMERAS, LIDAR, load_rig
from bevkit.data.synth.schema import ATTRIBUTE_TABLE, CATEGORY_TABLE, VISIBILITY_TABLE, token, visibility_token
from bevkit.geometry import make_transform, matrix_to_quat, yaw_to_matrix

SYNTH_FORMAT = 1  # bumped when the written layout changes
ANNOTATION_RANGE = 60.0  # metres from the ego within which agents are annotated
STEPS_PER_KEYFRAME = int(round(0.5 / DT))


@dataclass(frozen=True)
class SceneJob:
    """Everything one worker needs to generate one scene."""

    out: str
    seed: int
    index: int
    name: str
    location: str
    split: str
    samples: int
    scale: float
    lidar_hz: int
    start_us: int
    sky: str = ""


def _mini_locations():
    return {
        "scene-0061": "singapore-onenorth", "scene-0103": "boston-seaport", "scene-0553": "boston-seaport",
        "scene-0655": "boston-seaport", "scene-0757": "boston-seaport", "scene-0796": "singapore-queenstown",
        "scene-0916": "singapore-queenstown", "scene-1077": "singapore-hollandvillage",
        "scene-1094": "singapore-hollandvillage", "scene-1100": "singapore-hollandvillage",
    }


PRESETS = {
    # A few samples per scene for tests: v1.0-mini names, so nuScenes-mini tools run on it.
    "tiny": dict(version="v1.0-mini", scenes=(("scene-0061", "mini_train"), ("scene-0103", "mini_val")),
                 samples=6, scale=0.25, lidar_hz=10),
    # Mirrors v1.0-mini: ten scenes with its names and mini_train / mini_val membership, ~20 s each.
    "mini": dict(version="v1.0-mini", scenes=None, samples=40, scale=0.44, lidar_hz=10),
    # Tens of scenes for training beyond mini, named after v1.0-trainval scenes of each split.
    "small": dict(version="v1.0-trainval", scenes=None, samples=40, scale=0.44, lidar_hz=10,
                  n_train=40, n_val=10),
}


def plan_scenes(preset: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(version, [(scene name, location, split), ...]) for a preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    locs = _mini_locations()
    splits = official_splits()
    if preset == "tiny":
        return p["version"], [(n, locs[n], s) for n, s in p["scenes"]]
    if preset == "mini":
        out = [(n, locs[n], "mini_train") for n in splits["mini_train"]]
        out += [(n, locs[n], "mini_val") for n in splits["mini_val"]]
        return p["version"], sorted(out)
    names = ["boston-seaport", "singapore-onenorth", "singapore-queenstown", "singapore-hollandvillage"]
    out = [(n, names[i % 4], "train") for i, n in enumerate(splits["train"][: p["n_train"]])]
    out += [(n, names[i % 4], "val") for i, n in enumerate(splits["val"][: p["n_val"]])]
    return p["version"], sorted(out)


# ------------------------------------------------------------------------------------ workers
_CITY_CACHE: dict = {}
_PROGRESS = None


def _init_worker(queue):
    global _PROGRESS
    _PROGRESS = queue


# Each worker renders with numpy on one core: BLAS thread pools in several workers would
# oversubscribe the cores and spin (on 2 cores, two workers with 2 BLAS threads each ran at
# half speed). A spawned worker reads these when it imports numpy, so they are set in the
# parent's environment while the pool starts its workers, and restored afterwards.
_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children():
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update({k: "1" for k in _SINGLE_THREAD_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _visibility_geometry(rig):
    """The voxel-to-sensor geometry of a rig (fixed on the car): computed once per process."""
    key = ("visibility", rig.scale)
    if key not in _CITY_CACHE.setdefault("_rig", {}):
        _CITY_CACHE["_rig"][key] = occupancy.VisibilityGeometry(
            rig.cameras, [c.ego_from_cam for c in rig.cameras], rig.lidar.elevations_deg, rig.lidar.ego_from_lidar)
    return _CITY_CACHE["_rig"][key]


def _city(location: str, seed: int):
    key = (location, seed)
    if key not in _CITY_CACHE:
        for k in [k for k in _CITY_CACHE if k != "_rig"]:
            del _CITY_CACHE[k]  # one city at a time per worker: they are large
        _CITY_CACHE[key] = build_city(location, seed)
    return _CITY_CACHE[key]


def _select(hits, mask):
    return Hits(hits.t[mask], hits.prim[mask], hits.unoccluded)


def _pose_record(tok, city_from_x, city, timestamp):
    g = city.global_from_city @ city_from_x
    return {"token": tok, "timestamp": int(timestamp), "rotation": [float(v) for v in matrix_to_quat(g[:3, :3])],
            "translation": [float(v) for v in g[:3, 3]]}


def scene_world(job: SceneJob):
    """The city and the simulated scenario behind a scene (deterministic for the job)."""
    city = _city(job.location, job.seed)
    return city, make_scenario(city, job.seed, job.index, (job.samples - 1) * 0.5 + 0.05)


def scene_jobs(out, preset: str, seed: int = 0, scale=None, lidar_hz=None, samples=None) -> list[SceneJob]:
    """The jobs a preset runs (the same ones ``generate`` runs for these arguments)."""
    p = PRESETS[preset]
    _, scenes = plan_scenes(preset)
    return [SceneJob(str(out), seed, i, name, loc, split, p["samples"] if samples is None else int(samples),
                     p["scale"] if scale is None else float(scale), p["lidar_hz"] if lidar_hz is None else int(lidar_hz),
                     1_535_000_000_000_000 + i * 3_600_000_000 + seed * 86_400_000_000)
            for i, (name, loc, split) in enumerate(scenes)]


def generate_scene(job: SceneJob) -> dict:
    """Simulate, render and write one scene's files; return its table records."""
    rng = np.random.default_rng(stable_seed("render", job.seed, job.index))
    city, scn = scene_world(job)
    rig = load_rig(job.scale)
    out = Path(job.out)
    log_name = f"synth-{job.location}-{job.index:04d}"
    scene_tok = token(job.seed, "scene", job.name)
    log_tok = token(job.seed, "log", job.name)
    sensor_tok = {ch: token("sensor", ch) for ch in CAMERAS + (LIDAR,)}
    calib_tok = {ch: token(job.seed, "calibrated_sensor", job.name, ch) for ch in CAMERAS + (LIDAR,)}
    cam_rays = {cam.channel: camera_rays(cam.intrinsics, cam.width, cam.height) for cam in rig.cameras}
    lid_rays = lidar_rays(rig.lidar.elevations_deg, rig.lidar.azimuth_steps)
    city_rot = np.arctan2(city.global_from_city[1, 0], city.global_from_city[0, 0])
    sun_az = rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(sun_az) * 0.6, np.sin(sun_az) * 0.6, rng.uniform(0.55, 0.9)])
    sun /= np.linalg.norm(sun)
    parts_cache: dict = {}
    vis_geom = _visibility_geometry(rig)

    records = {k: [] for k in ("sample", "sample_data", "ego_pose", "sample_annotation", "instance",
                               "calibrated_sensor")}
    for cam in rig.cameras:
        records["calibrated_sensor"].append({
            "token": calib_tok[cam.channel], "sensor_token": sensor_tok[cam.channel],
            "translation": list(cam.translation), "rotation": list(cam.rotation),
            "camera_intrinsic": cam.intrinsics.tolist()})
    records["calibrated_sensor"].append({
        "token": calib_tok[LIDAR], "sensor_token": sensor_tok[LIDAR], "translation": list(rig.lidar.translation),
        "rotation": list(rig.lidar.rotation), "camera_intrinsic": []})

    key_steps = [i * STEPS_PER_KEYFRAME for i in range(job.samples)]
    lidar_every = int(round(1.0 / (job.lidar_hz * DT)))
    lidar_steps = list(range(0, key_steps[-1] + 1, lidar_every))
    sample_toks = [token(job.seed, "sample", job.name, i) for i in range(job.samples)]

    def ts(step):
        return job.start_us + int(round(step * DT * 1e6))

    def city_from_ego(k):
        return make_transform(yaw_to_matrix(scn.ego_yaw[k]), [scn.ego_x[k], scn.ego_y[k], 0.0])

    # Which agents are annotated in which keyframes: a contiguous run where they are in range.
    ann_keys = {}
    for a in scn.agents:
        d = np.array([np.hypot(a.x[k] - scn.ego_x[k], a.y[k] - scn.ego_y[k]) for k in key_steps])
        inside = np.nonzero(d <= ANNOTATION_RANGE)[0]
        if len(inside):
            ann_keys[a.id] = list(range(inside[0], inside[-1] + 1))

    # LiDAR: every sweep, keyframes under samples/, the others under sweeps/.
    lidar_sd = {}  # step -> sample_data record
    keyframe_points = {}
    range_images = {}
    for step in lidar_steps:
        is_key = step in key_steps
        cfe = city_from_ego(step)
        cfl = cfe @ rig.lidar.ego_from_lidar
        prims = scene_prims(scn, step, (scn.ego_x[step], scn.ego_y[step]), rig.lidar.max_range + 20, parts_cache)
        hits, dirs = cast(prims, cfl[:3, 3], lid_rays, cfl[:3, :3], max_range=rig.lidar.max_range)
        ok = np.isfinite(hits.t)
        t_noisy = hits.t + rng.normal(0, 0.015, size=hits.t.shape)
        ok &= rng.random(len(ok)) > 0.02  # dropped returns
        inten = np.zeros(len(ok))
        inten[ok] = lidar_intensity(city, prims, _select(hits, ok), cfl[:3, 3], dirs[ok], rng)
        dirs_l = lid_rays.dirs
        pts = np.concatenate([dirs_l[ok] * t_noisy[ok, None], inten[ok, None],
                              (np.arange(len(ok)) // rig.lidar.azimuth_steps)[ok, None]], axis=1).astype(np.float32)
        folder = "samples" if is_key else "sweeps"
        fname = f"{folder}/{LIDAR}/{log_name}__{LIDAR}__{ts(step)}.pcd.bin"
        (out / fname).parent.mkdir(parents=True, exist_ok=True)
        pts.tofile(out / fname)
        sd_tok = token(job.seed, "sample_data", job.name, LIDAR, step)
        records["ego_pose"].append(_pose_record(sd_tok, cfe, city, ts(step)))
        key_index = step // STEPS_PER_KEYFRAME if is_key else None
        sample_of = sample_toks[min((step + STEPS_PER_KEYFRAME - 1) // STEPS_PER_KEYFRAME, job.samples - 1)]
        lidar_sd[step] = {
            "token": sd_tok, "sample_token": sample_toks[key_index] if is_key else sample_of,
            "ego_pose_token": sd_tok, "calibrated_sensor_token": calib_tok[LIDAR], "timestamp": ts(step),
            "fileformat": "pcd", "is_key_frame": is_key, "height": 0, "width": 0, "filename": fname,
            "prev": "", "next": ""}
        if is_key:
            keyframe_points[step] = pts[:, :3].astype(np.float64) @ cfl[:3, :3].T + cfl[:3, 3]  # city frame
            range_images[step] = np.where(ok, hits.t, np.inf).reshape(len(rig.lidar.elevations_deg), -1)
        if _PROGRESS is not None and not is_key:
            _PROGRESS.put(("sweep", 1))
    chain = [lidar_sd[s] for s in lidar_steps]
    for a, b in zip(chain[:-1], chain[1:]):
        a["next"], b["prev"] = b["token"], a["token"]
    records["sample_data"].extend(chain)

    cam_chain = {cam.channel: [] for cam in rig.cameras}
    visible = {}  # (agent, key index) -> (visible px, unoccluded px)
    for i, step in enumerate(key_steps):
        cfe = city_from_ego(step)
        prims = scene_prims(scn, step, (scn.ego_x[step], scn.ego_y[step]), 160.0, parts_cache)
        depth_maps = []
        vis_px: dict = {}
        unocc_px: dict = {}
        for cam in rig.cameras:
            cfc = cfe @ cam.ego_from_cam
            hits, dirs = cast_camera(prims, cfc, cam.intrinsics, cam.width, cam.height, cam_rays[cam.channel],
                                     count_owners=True)
            colour = shade_camera(city, prims, hits, cfc[:3, 3], dirs, sun, rng)
            img = (colour.reshape(cam.height, cam.width, 3) * 255 + 0.5).astype(np.uint8)
            fname = f"samples/{cam.channel}/{log_name}__{cam.channel}__{ts(step)}.jpg"
            (out / fname).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out / fname, quality=90)
            depth_maps.append(hits.t.reshape(cam.height, cam.width))
            owners = prims.owner[hits.prim[hits.prim >= 0]]
            for a_id, n in zip(*np.unique(owners[owners >= 0], return_counts=True)):
                vis_px[int(a_id)] = vis_px.get(int(a_id), 0) + int(n)
            for a_id, n in hits.unoccluded.items():
                unocc_px[a_id] = unocc_px.get(a_id, 0) + n
            sd_tok = token(job.seed, "sample_data", job.name, cam.channel, step)
            records["ego_pose"].append(_pose_record(sd_tok, cfe, city, ts(step)))
            cam_chain[cam.channel].append({
                "token": sd_tok, "sample_token": sample_toks[i], "ego_pose_token": sd_tok,
                "calibrated_sensor_token": calib_tok[cam.channel], "timestamp": ts(step), "fileformat": "jpg",
                "is_key_frame": True, "height": cam.height, "width": cam.width, "filename": fname,
                "prev": "", "next": ""})
        for a_id in set(unocc_px) | set(vis_px):
            visible[(a_id, i)] = (vis_px.get(a_id, 0), unocc_px.get(a_id, 0))

        # Occ3D labels in the ego frame of this keyframe.
        sem = occupancy.semantics(city, prims, cfe)
        mask_cam = vis_geom.camera_mask(depth_maps)
        mask_lid = vis_geom.lidar_mask(range_images[step], rig.lidar.max_range)
        gdir = out / "gts" / job.name / sample_toks[i]
        gdir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(gdir / "labels.npz", semantics=sem, mask_lidar=mask_lid, mask_camera=mask_cam)
        records["sample"].append({
            "token": sample_toks[i], "timestamp": ts(step), "prev": sample_toks[i - 1] if i > 0 else "",
            "next": sample_toks[i + 1] if i + 1 < job.samples else "", "scene_token": scene_tok})
        if _PROGRESS is not None:
            _PROGRESS.put(("sample", 1))
    for chain in cam_chain.values():
        for a, b in zip(chain[:-1], chain[1:]):
            a["next"], b["prev"] = b["token"], a["token"]
        records["sample_data"].extend(chain)

    # Annotations and instances.
    cat_tok = {name: token("category", name) for name, _, _ in CATEGORY_TABLE}
    attr_tok = {name: token("attribute", name) for name, _ in ATTRIBUTE_TABLE}
    by_id = {a.id: a for a in scn.agents}
    for a_id, keys in sorted(ann_keys.items()):
        a = by_id[a_id]
        inst_tok = token(job.seed, "instance", job.name, a_id)
        ann_toks = [token(job.seed, "sample_annotation", job.name, a_id, i) for i in keys]
        for n, i in enumerate(keys):
            step = key_steps[i]
            pts_city = keyframe_points[step]
            centre_city = np.array([a.x[step], a.y[step], a.size[2] / 2])
            n_pts = int(points_in_box(pts_city, centre_city, a.yaw[step], a.size).sum())
            vis, unocc = visible.get((a_id, i), (0, 0))
            frac = vis / unocc if unocc > 0 else 0.0
            g = city.global_from_city @ np.append(centre_city, 1.0)
            attr = a.attribute(step)
            records["sample_annotation"].append({
                "token": ann_toks[n], "sample_token": sample_toks[i], "instance_token": inst_tok,
                "visibility_token": visibility_token(frac),
                "attribute_tokens": [attr_tok[attr]] if attr else [],
                "translation": [float(v) for v in g[:3]],
                "size": [float(a.size[1]), float(a.size[0]), float(a.size[2])],
                "rotation": [float(v) for v in matrix_to_quat(yaw_to_matrix(a.yaw[step] + city_rot))],
                "prev": ann_toks[n - 1] if n > 0 else "", "next": ann_toks[n + 1] if n + 1 < len(keys) else "",
                "num_lidar_pts": n_pts, "num_radar_pts": 0})
        records["instance"].append({
            "token": inst_tok, "category_token": cat_tok[a.category], "nbr_annotations": len(keys),
            "first_annotation_token": ann_toks[0], "last_annotation_token": ann_toks[-1]})

    tags = sorted({CATEGORIES[a.category][4] or a.category for a in scn.agents if a.id in ann_keys})
    records["scene"] = [{
        "token": scene_tok, "log_token": log_tok, "nbr_samples": job.samples, "first_sample_token": sample_toks[0],
        "last_sample_token": sample_toks[-1], "name": job.name,
        "description": f"Synthetic {job.location} drive, {scn.ego_speed.mean():.1f} m/s; " + ", ".join(tags)}]
    records["log"] = [{"token": log_tok, "logfile": log_name, "vehicle": "synth-ego",
                       "date_captured": time.strftime("%Y-%m-%d", time.gmtime(job.start_us / 1e6)),
                       "location": job.location}]
    return records


# --------------------------------------------------------------------------------- the dataset
def generate(out: str | os.PathLike, preset: str = "mini", seed: int = 0, scale: float | None = None,
             workers: int | None = None, lidar_hz: int | None = None, overwrite: bool = False,
             samples: int | None = None, progress: bool = True) -> dict:
    """Write a synthetic nuScenes-format dataset to ``out``; returns a summary.

    ``out`` must be absent or empty unless ``overwrite``; the dataset appears there only once it
    is complete (it is built in a temporary folder beside it and renamed).
    """
    out = Path(out)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    scale = p["scale"] if scale is None else float(scale)
    lidar_hz = p["lidar_hz"] if lidar_hz is None else int(lidar_hz)
    samples = p["samples"] if samples is None else int(samples)
    if lidar_hz not in (2, 4, 10, 20):
        raise ValueError(f"lidar rate must be 2, 4, 10 or 20 Hz, got {lidar_hz}")
    if not 0.05 <= scale <= 1.0:
        raise ValueError(f"image scale must be in [0.05, 1.0], got {scale}")
    if samples < 2:
        raise ValueError(f"a scene needs at least 2 samples, got {samples}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    version, scenes = plan_scenes(preset)
    workers = workers or min(len(scenes), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot create the dataset folder there ({e.strerror})", str(out.parent)) from None
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp makes it private)
    t0 = time.time()
    try:
        jobs = scene_jobs(tmp, preset, seed, scale, lidar_hz, samples)
        results = _run_jobs(jobs, workers, progress, lidar_hz)
        _write_tables(tmp, version, seed, jobs, results)
        elapsed = time.time() - t0
        summary = {
            "preset": preset, "version": version, "seed": seed, "scale": scale, "lidar_hz": lidar_hz,
            "scenes": len(jobs), "samples": sum(len(r["sample"]) for r in results),
            "annotations": sum(len(r["sample_annotation"]) for r in results),
            "seconds": round(elapsed, 1), "bytes": _du(tmp), "workers": workers,
            "synth_format": SYNTH_FORMAT,
        }
        (tmp / version / "synth.json").write_text(json.dumps(summary, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:  # --overwrite of a plain file
                old.unlink()
        else:
            tmp.rename(out)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run_jobs(jobs, workers, progress, lidar_hz):
    from tqdm import tqdm

    total = sum(j.samples for j in jobs)
    if workers == 1:
        results = []
        with tqdm(total=total, unit="sample", desc="synth", disable=not progress) as bar:
            for job in jobs:
                results.append(generate_scene(job))
                bar.update(job.samples)
        return results
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queue = manager.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(queue,)) as pool, \
            tqdm(total=total, unit="sample", desc="synth", disable=not progress) as bar:
        with _single_threaded_children():
            futures = [pool.submit(generate_scene, j) for j in jobs]
        while True:
            try:
                kind, n = queue.get(timeout=0.5)
                if kind == "sample":
                    bar.update(n)
                continue
            except queue_module.Empty:
                pass
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
            if all(f.done() for f in futures):
                break
        results = [f.result() for f in futures]
    manager.shutdown()
    return results


def _write_tables(root: Path, version: str, seed: int, jobs, results) -> None:
    tables: dict = {k: [] for k in ("category", "attribute", "visibility", "instance", "sensor",
                                    "calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data",
                                    "sample_annotation", "map")}
    tables["category"] = [{"token": token("category", n), "name": n, "description": d, "index": i}
                          for n, i, d in CATEGORY_TABLE]
    tables["attribute"] = [{"token": token("attribute", n), "name": n, "description": d} for n, d in ATTRIBUTE_TABLE]
    tables["visibility"] = [{"token": t, "level": lv, "description": d} for t, lv, d in VISIBILITY_TABLE]
    tables["sensor"] = [{"token": token("sensor", ch), "channel": ch, "modality": "camera"} for ch in CAMERAS]
    tables["sensor"].append({"token": token("sensor", LIDAR), "channel": LIDAR, "modality": "lidar"})
    for r in results:
        for k in ("instance", "calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data",
                  "sample_annotation"):
            tables[k].extend(r[k])
    # One map (mask PNG + expansion JSON) per location, linked to the logs recorded there.
    (root / "maps" / "expansion").mkdir(parents=True, exist_ok=True)
    for location in sorted({j.location for j in jobs}):
        city = build_city(location, seed)
        map_tok = token(seed, "map", location)
        drivable_mask_png(city, root / "maps" / f"{map_tok}.png")
        (root / "maps" / "expansion" / f"{location}.json").write_text(json.dumps(build_map_json(city)))
        tables["map"].append({
            "token": map_tok, "category": "semantic_prior", "filename": f"maps/{map_tok}.png",
            "log_tokens": [r["log"][0]["token"] for r, j in zip(results, jobs) if j.location == location]})
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (vdir / f"{name}.json").write_text(json.dumps(rows, indent=0))
    splits: dict = {}
    for j in jobs:
        splits.setdefault(j.split, []).append(j.name)
    (vdir / "splits.json").write_text(json.dumps(splits, indent=1))


__all__ = ["generate", "generate_scene", "plan_scenes", "scene_jobs", "scene_world", "PRESETS", "SceneJob"]
