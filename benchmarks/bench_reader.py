"""Reader speed, as JSON: building our index against the devkit's NuScenes(...) constructor on the
same data in one run, and DataLoader throughput at the default training resolution.

    python benchmarks/bench_reader.py data/synth-mini --workers 2
    python benchmarks/bench_reader.py data/synth-mini --scale 8   # tables replicated 8 times
    python benchmarks/bench_reader.py data/synth-mini --real-rates  # with the real rig's sweeps

``--scale K`` times the index and the devkit on a table-only copy of the version with every
scene (and its samples, sensor records, poses, annotations, instances and logs) replicated K
times under new tokens: both readers parse and link K times the records, no sensor file is
read, and the DataLoader is not timed.

Each figure is the best of ``--repeat`` calls, with the median beside it for the index build
and the devkit: whether a full collection of the process's objects (about 300,000 tracked ones
once torch and bevkit are imported) falls in a devkit call moves it by 2x. The devkit is also
timed with the collector paused around the call, as our build pauses it; its instances hold a
reference cycle, so the collector runs, untimed, before each such call.
"""

import argparse
import gc
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bevkit.data.dataset import DataConfig, NuScenesDataset, collate
from bevkit.data.nuscenes import NuScenesIndex, find_version


def timings(fn, repeat, before=None) -> list[float]:
    """Seconds of ``repeat`` calls, sorted; each result is dropped before the next call, and
    ``before()`` (untimed) runs before each."""
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)


def best_of(fn, repeat):
    return timings(fn, repeat)[0]


def gc_paused(fn):
    """``fn`` with Python's cyclic collector paused during the call, as our build does itself."""
    def call():
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn()
        finally:
            if enabled:
                gc.enable()
    return call


SHARED_TABLES = ("category", "attribute", "visibility", "sensor")
REPLICATED_TABLES = ("scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation",
                     "instance", "log")


def replicate(root: Path, version: str, k: int, out: Path) -> Path:
    """Write ``out/version`` with the tables of ``root/version`` replicated ``k`` times.

    Copy i of every token gets the suffix ``i`` (two digits); tokens of the shared tables
    (categories, attributes, visibilities, sensors) are kept, scene names get ``-i``, and the
    map table lists every copy's logs. ``maps/`` links to the original.
    """
    src = root / version
    shared = set()
    for name in SHARED_TABLES:
        shared.update(r["token"] for r in json.loads((src / f"{name}.json").read_text()))

    def suffix(v, i):
        if isinstance(v, list):
            return [suffix(x, i) for x in v]
        return v if not isinstance(v, str) or v == "" or v in shared else f"{v}{i:02d}"

    def copy(rec, i):
        out_rec = {}
        for key, v in rec.items():
            if key == "token" or key.endswith(("_token", "_tokens")) or key in ("prev", "next"):
                v = suffix(v, i)
            elif key == "name" and "log_token" in rec and i:
                v = f"{v}-{i:02d}"
            out_rec[key] = v
        return out_rec

    dst = out / version
    dst.mkdir(parents=True)
    for name in SHARED_TABLES:
        (dst / f"{name}.json").write_bytes((src / f"{name}.json").read_bytes())
    for name in REPLICATED_TABLES:
        rows = json.loads((src / f"{name}.json").read_text())
        (dst / f"{name}.json").write_text(json.dumps([copy(r, i) for i in range(k) for r in rows], indent=0))
    maps = json.loads((src / "map.json").read_text())
    for m in maps:
        m["log_tokens"] = [suffix(t, i) for i in range(k) for t in m["log_tokens"]]
    (dst / "map.json").write_text(json.dumps(maps, indent=0))
    os.symlink((root / "maps").resolve(), out / "maps")
    return out


RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
CAMERA_HZ, LIDAR_HZ, RADAR_HZ = 12, 20, 13  # the real rig's rates; keyframes are 2 Hz


def with_real_rates(root: Path, version: str, out: Path) -> Path:
    """Write ``out/version``: the tables of ``root/version`` with the sweeps the real rig records and the
    synthetic world does not write. Between consecutive records of each camera (keyframes, 2 Hz) go the
    sweeps of 12 Hz; each LiDAR gets the sweeps that make 20 Hz; five radars (a sensor and a calibration
    per LiDAR calibration) record at 13 Hz, the record nearest each LiDAR keyframe being a keyframe. Each
    added record has its own ego pose, the translation interpolated between the records around it. Only
    tables: no sensor file is read by either reader. ``maps/`` links to the original.
    """
    src = root / version
    tables = {n: json.loads((src / f"{n}.json").read_text()) for n in ("sample_data", "ego_pose",
                                                                       "calibrated_sensor", "sensor")}
    sd, poses, cs, sensors = (tables[n] for n in ("sample_data", "ego_pose", "calibrated_sensor", "sensor"))
    pose = {p["token"]: p for p in poses}
    channel = {c["token"]: next(s["channel"] for s in sensors if s["token"] == c["sensor_token"]) for c in cs}

    def token(*parts) -> str:
        return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()

    def record(like: dict, key: str, ts: int, a: dict, b: dict, **fields) -> dict:
        f = (ts - a["timestamp"]) / max(b["timestamp"] - a["timestamp"], 1)
        pa, pb = pose[a["ego_pose_token"]], pose[b["ego_pose_token"]]
        poses.append({"token": key, "timestamp": ts, "rotation": pa["rotation"],
                      "translation": [x + (y - x) * f for x, y in zip(pa["translation"], pb["translation"])]})
        return {**like, "token": key, "ego_pose_token": key, "timestamp": ts, "is_key_frame": False,
                "filename": f"sweeps/{channel[like['calibrated_sensor_token']]}/{key}.bin", **fields}

    def link(chain: list) -> list:
        for i, r in enumerate(chain):
            r["prev"] = chain[i - 1]["token"] if i else ""
            r["next"] = chain[i + 1]["token"] if i + 1 < len(chain) else ""
        return chain

    for name in RADARS:
        sensors.append({"token": token("sensor", name), "channel": name, "modality": "radar"})
    chains: dict = {}
    for r in sorted(sd, key=lambda r: r["timestamp"]):
        runs = chains.setdefault(r["calibrated_sensor_token"], [])
        if not r["prev"] or not runs:
            runs.append([])
        runs[-1].append(r)
    out_sd = []
    for calib, runs in chains.items():
        ch = channel[calib]
        rate = CAMERA_HZ if ch.startswith("CAM") else LIDAR_HZ
        for run in runs:
            chain = [run[0]]
            for a, b in zip(run, run[1:]):
                between = max(round(rate * (b["timestamp"] - a["timestamp"]) * 1e-6) - 1, 0)
                for i in range(1, between + 1):
                    ts = a["timestamp"] + (b["timestamp"] - a["timestamp"]) * i // (between + 1)
                    chain.append(record(a, token(a["token"], i), ts, a, b))
                chain.append(b)
            out_sd += link(chain)
            if ch != "LIDAR_TOP":
                continue
            keys = [r for r in run if r["is_key_frame"]]
            for name in RADARS:
                radar_cs = token("calibration", calib, name)
                if not any(c["token"] == radar_cs for c in cs):
                    cs.append({"token": radar_cs, "sensor_token": token("sensor", name), "translation": [3.4, 0.0, 0.6],
                               "rotation": [1.0, 0.0, 0.0, 0.0], "camera_intrinsic": []})
                t0, t1 = run[0]["timestamp"], run[-1]["timestamp"]
                times = list(range(t0, t1 + 1, 10**6 // RADAR_HZ))
                nearest = {min(range(len(times)), key=lambda i: abs(times[i] - k["timestamp"])): k for k in keys}
                chain = []
                for i, ts in enumerate(times):
                    a = max((r for r in run if r["timestamp"] <= ts), key=lambda r: r["timestamp"])
                    b = min((r for r in run if r["timestamp"] >= ts), key=lambda r: r["timestamp"])
                    key = nearest.get(i)
                    owner = key or min(keys, key=lambda k: abs(k["timestamp"] - ts))
                    chain.append(record(a, token(radar_cs, ts), ts, a, b, calibrated_sensor_token=radar_cs,
                                        sample_token=owner["sample_token"], is_key_frame=key is not None,
                                        fileformat="pcd", width=0, height=0))
                out_sd += link(chain)
    tables["sample_data"] = out_sd
    dst = out / version
    dst.mkdir(parents=True)
    for p in src.glob("*.json"):
        if p.stem not in tables:
            (dst / p.name).write_bytes(p.read_bytes())
    for name, rows in tables.items():
        (dst / f"{name}.json").write_text(json.dumps(rows, indent=0))
    os.symlink((root / "maps").resolve(), out / "maps")
    return out


def time_indexes(root, version: str, repeat: int, out: dict) -> None:
    """Index build, cached load and the devkit's constructor on ``root``: best of ``repeat`` calls,
    and the median for the build and the devkit (also timed with the collector paused)."""
    with tempfile.TemporaryDirectory() as cache:
        build = timings(lambda: NuScenesIndex.load(root, version, cache_dir=cache, rebuild=True), repeat)
        out["index_build_s"], out["index_build_median_s"] = build[0], build[len(build) // 2]
        out["index_cached_load_s"] = best_of(lambda: NuScenesIndex.load(root, version, cache_dir=cache), repeat)
        # Sample dicts are made from the index's arrays when first asked for: what all of them cost.
        out["index_all_sample_dicts_s"] = best_of(
            lambda: NuScenesIndex.load(root, version, cache_dir=cache).samples[:], repeat) \
            - out["index_cached_load_s"]
    try:
        from nuscenes import NuScenes
    except ImportError:
        out["devkit_constructor_s"] = None
        return
    devkit = timings(lambda: NuScenes(version, str(root), verbose=False), repeat)
    out["devkit_constructor_s"], out["devkit_constructor_median_s"] = devkit[0], devkit[len(devkit) // 2]
    # The devkit's time depends on whether a full collection of the process's objects falls in
    # the call; our build pauses the collector itself. A devkit instance is a reference cycle
    # (it holds an explorer that holds it), freed only by the collector: collect before each call.
    paused = timings(gc_paused(lambda: NuScenes(version, str(root), verbose=False)), repeat, before=gc.collect)
    out["devkit_constructor_gc_paused_s"], out["devkit_constructor_gc_paused_median_s"] = (
        paused[0], paused[len(paused) // 2])
    out["build_speedup_vs_devkit"] = out["devkit_constructor_s"] / out["index_build_s"]
    out["build_speedup_vs_devkit_median"] = out["devkit_constructor_median_s"] / out["index_build_median_s"]
    out["build_speedup_vs_devkit_gc_paused"] = out["devkit_constructor_gc_paused_s"] / out["index_build_s"]
    out["cached_speedup_vs_devkit"] = out["devkit_constructor_s"] / out["index_cached_load_s"]


def report(out: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--version", default=None)
    ap.add_argument("--split", default="mini_train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--scale", type=int, default=1,
                    help="time the indexes on a table-only copy with every scene replicated this many times")
    ap.add_argument("--real-rates", action="store_true",
                    help="time the indexes on a table-only copy with the sweeps of the real rig added (cameras "
                         "12 Hz, LiDAR 20 Hz, five radars 13 Hz)")
    args = ap.parse_args()
    if args.scale < 1:
        ap.error("--scale must be at least 1")
    if args.real_rates and args.scale > 1:
        ap.error("--real-rates and --scale: give one of them")
    version = args.version or find_version(args.root)
    out = {"benchmark": "reader", "root": str(args.root), "version": version}
    if args.real_rates:
        with tempfile.TemporaryDirectory() as tmp:
            dense = with_real_rates(Path(args.root), version, Path(tmp) / "real-rates")
            sd = json.loads((dense / version / "sample_data.json").read_text())
            out["real_rates"] = {"sample_data": len(sd), "keyframe_records": sum(r["is_key_frame"] for r in sd)}
            time_indexes(dense, version, args.repeat, out)
        report(out)
        return
    if args.scale > 1:
        with tempfile.TemporaryDirectory() as tmp:
            scaled = replicate(Path(args.root), version, args.scale, Path(tmp) / "scaled")
            out["scale"] = args.scale
            time_indexes(scaled, version, args.repeat, out)
        report(out)
        return
    time_indexes(args.root, version, args.repeat, out)
    with tempfile.TemporaryDirectory() as cache:
        index = NuScenesIndex.load(args.root, version, cache_dir=cache)  # held in memory from here
    cfg = DataConfig(image_size=(256, 704))
    ds = NuScenesDataset(args.root, args.split, cfg, index=index)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=args.workers,
                                         collate_fn=collate, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # workers started, first batch out of the way
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.batches):
        batch = next(it)
        n += len(batch["token"])
    dt = time.perf_counter() - t0
    out.update({"loader_workers": args.workers, "loader_image_size": [256, 704], "loader_cameras": 6,
                "loader_points": "keyframe", "loader_samples_per_s": n / dt})
    report(out)


if __name__ == "__main__":
    main()
