"""A trained model as one ONNX graph of standard operators, checked against PyTorch in onnxruntime.

The graph is the model's forward from sensor tensors to the raw head outputs; what has
data-dependent sizes stays outside it, as deployed BEV models do: LiDAR voxelisation (the graph takes
the pillars ``PointPillars.pillars`` makes) and box decoding (top-k, circle / rotated NMS: run
``BEVModel.decode`` on the outputs, rebuilt with :func:`nest`). Inside, the ops take their exportable
formulations (``bev_pool_exportable`` with the frustum's cells computed in the graph from the camera
matrices, ``deform_attn_exportable``), which equal the fast paths.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from bevkit.atomic import write_text_atomic
from bevkit.config import ConfigError, ExperimentConfig
from bevkit.models.bev_model import BEVModel
from bevkit.models.bevformer import BEVFormerEncoder
from bevkit.models.lidar import PointPillars

CAMERA_INPUTS = ("images", "intrinsics", "img_aug", "ego_from_cam")
PILLAR_INPUTS = ("pillar_features", "pillar_coords", "pillar_counts")
TEMPORAL_INPUTS = ("prev_bev", "curr_from_prev", "prev_valid")
# What each graph input is (shapes with the batch B the graph was exported for).
INPUT_DOC = {
    "images": "(B, N, 3, H, W) uint8 RGB, the cameras of data.cameras in that order, resized and cropped as "
              "img_aug says",
    "intrinsics": "(B, N, 3, 3) float32 camera matrices of the original images",
    "img_aug": "(B, N, 3, 3) float32 original image pixels -> input image pixels",
    "ego_from_cam": "(B, N, 4, 4) float32 camera poses in the ego frame (composed with a BEV augmentation if any)",
    "pillar_features": "(V, M, F) float32 points of each pillar in ego (x, y, z, features), zero rows past the count",
    "pillar_coords": "(V, 4) int64 (b, iz, iy, ix) cell of each pillar on the BEV grid",
    "pillar_counts": "(V,) int64 points in each pillar (at least 1)",
    "prev_bev": "(B, T-1, C, Y, X) float32 the 'bev' output of the previous keyframes, most recent first",
    "curr_from_prev": "(B, T-1, 4, 4) float32 ego frame of each previous keyframe -> current ego frame",
    "prev_valid": "(B,) bool BEVFormer: whether prev_bev holds a previous frame (False: the queries stand in)",
    "map_prior": "(B, C, Y, X) float32 the global map memory read on this grid (zeros: nothing observed)",
}


def graph_inputs(model: BEVModel, history: int) -> list[str]:
    """Names of the graph's inputs for a model, in order.

    Raises ``ConfigError`` for branches with no exportable formulation (the sparse-voxel LiDAR
    encoder, whose sparse convolutions have data-dependent sizes, and BEVFusion's LiDAR-depth
    camera branch, which projects a variable number of points).
    """
    from bevkit.models.view_transforms import DepthLiftSplat

    names: list[str] = []
    if model.view_transform is not None:
        if isinstance(model.view_transform, DepthLiftSplat):
            raise ConfigError("export: view_transform lss_depth (BEVFusion's LiDAR depth into the camera branch) "
                              "projects a variable number of points and has no exportable form")
        names += CAMERA_INPUTS
    if model.lidar is not None:
        if not isinstance(model.lidar, PointPillars):
            raise ConfigError(f"export: the LiDAR encoder {type(model.lidar).__name__} runs sparse convolutions "
                              "with data-dependent sizes and has no exportable form; PointPillars exports")
        names += PILLAR_INPUTS
    if history:
        names += TEMPORAL_INPUTS[:2]
        if isinstance(model.view_transform, BEVFormerEncoder):
            names.append("prev_valid")
    if model.map_prior is not None:
        names.append("map_prior")
    return names


def flatten_outputs(out: dict, temporal: bool) -> dict[str, Tensor]:
    """The graph's outputs of a forward's result, by dotted name: ``bev`` (temporal models: the state
    for the next frame), ``features``, every head's raw outputs (``detection.0.heatmap``...), and
    ``map_prior_update`` with a map prior. The order is the graph's output order."""
    flat: dict[str, Tensor] = {}

    def walk(prefix: str, value):
        if isinstance(value, Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif value is not None:
            raise TypeError(f"output {prefix}: unexpected {type(value).__name__}")

    keys = (["bev"] if temporal else []) + ["features"]
    keys += [k for k in out if k not in ("bev", "features", "depth", "map_prior_update")]
    keys += ["map_prior_update"] if "map_prior_update" in out else []
    for key in keys:
        walk(key, out[key])
    return flat


def nest(named: dict) -> dict:
    """Rebuild the nested head outputs from dotted names (the inverse of :func:`flatten_outputs`):
    ``{"detection.0.heatmap": x}`` -> ``{"detection": [{"heatmap": x}]}``; numpy arrays are made
    tensors. ``model.decode(nest(outputs))`` decodes an onnxruntime result."""
    root: dict = {}
    for name, value in named.items():
        if not torch.is_tensor(value):
            value = torch.as_tensor(value)
        parts = name.split(".")
        node = root
        for part, nxt in zip(parts[:-1], parts[1:]):
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node):
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(re.fullmatch(r"\d+", k) for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return lists(root)


class ExportGraph(nn.Module):
    """The model's forward on flat tensors (the graph inputs of :func:`graph_inputs`), returning the
    tensors of :func:`flatten_outputs` as a tuple."""

    def __init__(self, model: BEVModel, inputs: list[str], batch_size: int, history: int):
        super().__init__()
        self.model = model
        self.inputs = list(inputs)
        self.batch_size = batch_size
        self.history = history

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        given = dict(zip(self.inputs, args))
        batch = {k: given[k] for k in CAMERA_INPUTS + TEMPORAL_INPUTS + ("map_prior",) if k in given}
        if "pillar_features" in given:
            batch["pillars"] = (given["pillar_features"], given["pillar_coords"], given["pillar_counts"],
                                self.batch_size)
        return tuple(flatten_outputs(self.model(batch), bool(self.history)).values())


def example_batch(cfg: ExperimentConfig, model: BEVModel, split: str, sample: int, dataset=None) -> dict:
    """Sample ``sample`` of ``split`` as a batch of one, as evaluation reads it: history frames encoded
    into ``prev_bev`` for temporal models, pillars for PointPillars, and a map prior (the model's own
    update of this frame, what a second visit reads) for Neural Map Prior. ``dataset``: the split's
    ``HistoryDataset`` if already made."""
    from bevkit.engine.data import BEVDataModule, collate_history
    from bevkit.engine.module import with_history

    ds = dataset if dataset is not None else BEVDataModule(cfg).dataset(split, train=False)
    if not 0 <= sample < len(ds):
        raise ConfigError(f"export: --sample {sample} is not in split {split!r} ({len(ds)} samples)")
    batch = with_history(model, collate_history([ds[sample]]))
    batch.pop("history", None)
    if model.lidar is not None and isinstance(model.lidar, PointPillars):
        batch["pillars"] = (*model.lidar.pillars(batch["points"]), len(batch["points"]))
    if model.map_prior is not None:
        with torch.no_grad():
            batch["map_prior"] = model(batch)["map_prior_update"]
    return batch


def graph_args(batch: dict, inputs: list[str]) -> tuple[Tensor, ...]:
    """The graph's input tensors from a batch (camera matrices as float32; the camera poses composed
    with the batch's ``bev_aug``, as the model composes them)."""
    from bevkit.models.bev_model import camera_geometry

    args = []
    for name in inputs:
        if name == "ego_from_cam":
            args.append(camera_geometry(batch)[2].float())
        elif name in PILLAR_INPUTS:
            args.append(batch["pillars"][PILLAR_INPUTS.index(name)])
        elif name == "images":
            args.append(batch["images"])
        elif name == "prev_valid":  # a loaded batch always holds its history
            args.append(batch.get("prev_valid", torch.ones(len(batch["images"]), dtype=torch.bool)))
        else:
            args.append(batch[name].float())
    return tuple(args)


def _export(graph: ExportGraph, args: tuple, path: Path, names_out: list[str], opset: int | None) -> None:
    dynamic = None
    if "pillar_features" in graph.inputs:  # the number of pillars varies from sweep to sweep
        pillars = torch.export.Dim("pillars", min=2, max=2**31 - 2)
        # one entry per forward parameter: the variadic ``*args`` takes a tuple, one spec per input
        dynamic = (tuple({0: pillars} if n in PILLAR_INPUTS else None for n in graph.inputs),)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions and dynamic shapes
        program = torch.onnx.export(graph, args, dynamo=True, verbose=False, input_names=graph.inputs,
                                    output_names=names_out, opset_version=opset, dynamic_shapes=dynamic,
                                    external_data=False)
        program.save(str(path), external_data=False)
    with open(path, "rb") as f:  # on disk before it is renamed into place
        os.fsync(f.fileno())


MIN_OPSET = 18  # the dynamo exporter writes opset 18 or later; below, its version converter fails


def written_opset(path: Path) -> int:
    """The default-domain opset a saved ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _median_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeat // 2]


def output_difference(got: Tensor, ref: Tensor) -> dict:
    """How far one graph output is from PyTorch's: the largest absolute difference, the largest magnitude
    of PyTorch's, their ratio, and the elements finite in one and not the other (``mismatched_finite``;
    any makes the ratio infinite, so a NaN in the graph's output fails the check). Elements that are the
    same non-finite value in both count as equal.

    Shapes:
        got, ref: the same shape
    """
    got, ref = got.float(), ref.float()
    both = torch.isfinite(got) & torch.isfinite(ref)
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    mismatched = int((~both & ~same).sum())
    diff = float((got - ref)[both].abs().max()) if both.any() else 0.0
    scale = float(ref[torch.isfinite(ref)].abs().max()) if torch.isfinite(ref).any() else 0.0
    rel = math.inf if mismatched else (diff / scale if scale > 0 else diff)
    return {"shape": list(got.shape), "max_abs_diff": diff, "max_abs": scale, "rel_diff": rel,
            "mismatched_finite": mismatched}


def parity(path: Path, model: BEVModel, batch: dict, inputs: list[str], history: int) -> dict:
    """The ONNX graph in onnxruntime against the PyTorch model (its fast paths) on one batch: per output
    :func:`output_difference`, their worst ratio ``max_rel_diff``, and, with a detection head, the
    decoded boxes compared one by one (:func:`compare_detections`); the latency of both (median of
    three calls after a warm-up, this machine's threads)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    given = dict(zip(inputs, graph_args(batch, inputs)))
    feeds = {i.name: given[i.name].numpy() for i in session.get_inputs()}  # by name
    got = session.run(None, feeds)
    with torch.no_grad():
        ref = flatten_outputs(model(batch), bool(history))
        # Latency on this machine, each after the warm-up call above: median of three.
        ort_s = _median_time(lambda: session.run(None, feeds))
        torch_s = _median_time(lambda: model(batch))
    names = [o.name for o in session.get_outputs()]
    if names != list(ref):
        raise RuntimeError(f"export: the graph's outputs {names} are not the model's {list(ref)}")
    report = {"outputs": {}, "onnxruntime_s": ort_s, "torch_s": torch_s}
    for name, value in zip(names, got):
        report["outputs"][name] = output_difference(torch.from_numpy(value), ref[name])
    report["max_rel_diff"] = max((o["rel_diff"] for o in report["outputs"].values()), default=0.0)
    if "detection" in model.heads:
        head = model.heads["detection"]
        with torch.no_grad():
            mine = head.decode(nest(dict(zip(names, got)))["detection"])
            theirs = head.decode(nest(ref)["detection"])
        report["decoded"] = compare_detections(mine, theirs, threshold=getattr(head.cfg, "score_threshold", None),
                                               max_boxes=getattr(head.cfg, "max_boxes", None))
    return report


def _box_distance(x: Tensor, y: Tensor) -> Tensor:
    """Largest element-wise difference between every pair of decoded boxes (yaw wrapped to [-pi, pi],
    NaN velocities equal to NaN, and infinitely far from a number).

    Shapes:
        x: (M, 9)   y: (M', 9)   returns: (M, M')
    """
    d = x[:, None] - y[None]  # (M, M', 9)
    d[..., 6] = torch.atan2(torch.sin(d[..., 6]), torch.cos(d[..., 6]))
    d = d.abs()
    both_nan = torch.isnan(x)[:, None] & torch.isnan(y)[None]
    d = torch.where(both_nan, torch.zeros_like(d), d.nan_to_num(nan=float("inf")))
    return d.amax(-1)


def compare_detections(mine: list[dict], ref: list[dict], tol: float = 1e-3, score_tol: float = 1e-5,
                       threshold: float | None = None, max_boxes: int | None = None) -> dict:
    """Decoded boxes of the graph against PyTorch's, sample by sample.

    Equal scores can be ranked in either order, so boxes are paired one to one, nearest first: two
    boxes pair when they have the same label, their scores differ by at most ``score_tol`` and their
    9 values by at most ``tol`` (yaw wrapped; a NaN only pairs with a NaN). A box left without a
    partner counts as ``at_cutoff`` when its score is within ``score_tol`` of the decoder's score
    ``threshold``, or of the other list's lowest score when that list holds ``max_boxes`` (a tie at
    the box limit went the other way), else as ``unmatched``. ``max_box_diff`` / ``max_score_diff`` are over the pairs.

    Shapes:
        mine, ref: per sample {boxes (M, 9), scores (M,), labels (M,)}
    """
    if len(mine) != len(ref):
        raise ValueError(f"compare_detections: {len(mine)} samples against {len(ref)}")
    unmatched = at_cutoff = 0
    box_diff = score_diff = 0.0
    for x, y in zip(mine, ref):
        mx, my = len(x["boxes"]), len(y["boxes"])
        free_x = torch.ones(mx, dtype=torch.bool)
        free_y = torch.ones(my, dtype=torch.bool)
        if mx and my:
            d = _box_distance(x["boxes"].double(), y["boxes"].double())
            ds = (x["scores"].double()[:, None] - y["scores"].double()[None]).abs()
            ok = (x["labels"][:, None] == y["labels"][None]) & (d <= tol) & (ds <= score_tol)
            cand = ok.nonzero()
            order = torch.argsort(d[cand[:, 0], cand[:, 1]], stable=True)
            for i, j in cand[order].tolist():  # nearest pairs first, each box used once
                if free_x[i] and free_y[j]:
                    free_x[i] = free_y[j] = False
                    box_diff = max(box_diff, float(d[i, j]))
                    score_diff = max(score_diff, float(ds[i, j]))
        for side, free, other in ((x, free_x, y), (y, free_y, x)):
            if not free.any():
                continue
            scores = side["scores"][free].double()
            near = torch.zeros_like(scores, dtype=torch.bool)
            if max_boxes is not None and len(other["scores"]) >= max_boxes:
                near |= (scores - other["scores"].double().min()).abs() <= score_tol
            if threshold is not None:
                near |= (scores - threshold).abs() <= score_tol
            at_cutoff += int(near.sum())
            unmatched += int((~near).sum())
    return {"boxes_onnx": sum(len(a["boxes"]) for a in mine), "boxes_torch": sum(len(b["boxes"]) for b in ref),
            "unmatched": unmatched, "at_cutoff": at_cutoff, "max_box_diff": box_diff, "max_score_diff": score_diff}


def require_exporter(opset: int | None = None) -> None:
    """Raise ``ConfigError`` naming what to install when the exporter, onnxruntime or a recent enough
    torch is missing, or when ``opset`` is one the exporter cannot write."""
    import importlib.util
    import inspect

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"export needs {', '.join(missing)}: pip install 'bevkit[export]' "
                          "(or pip install onnx onnxscript onnxruntime)")
    params = set(inspect.signature(torch.onnx.export).parameters)
    if not hasattr(torch.compiler, "is_exporting") or not {"dynamo", "dynamic_shapes", "external_data"} <= params:
        raise ConfigError("export needs torch's dynamo ONNX exporter (torch >= 2.6); "
                          f"this is torch {torch.__version__}")
    if opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise ConfigError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {newest} "
                              f"(this onnx {onnx.__version__})")


def load_trained(cfg: ExperimentConfig, ckpt_path) -> BEVModel:
    """The model of ``cfg`` with a checkpoint's weights (its EMA if it has one), in eval mode on the CPU;
    a checkpoint of another model is refused, as ``bevkit eval`` refuses it."""
    from bevkit.engine.checkpoint import build_experiment_model, checked_state, load_state

    state = checked_state(cfg, ckpt_path)
    model = load_state(build_experiment_model(cfg, load_checkpoint=False), state, ckpt_path)
    return model.eval()


def export_onnx(cfg: ExperimentConfig, model: BEVModel, out, split: str | None = None, sample: int = 0,
                opset: int | None = None, tolerance: float = 1e-4) -> dict:
    """Export ``model`` to ``out`` and check it in onnxruntime on sample ``sample`` of ``split`` and the
    next one. The model is put in eval mode on the CPU (in place).

    The check passes (``report["ok"]``) when every output is within ``tolerance`` of PyTorch's
    (relative to its largest magnitude, with no element finite in one and not the other) and, with a
    detection head, every decoded box has a partner (ties at a cut-off aside; see
    :func:`compare_detections`). Then ``out`` (one file, weights inside) and ``out`` + ``.json``
    (inputs with their meaning, outputs, opset, the parity figures and the model config) are renamed
    into place, the description first written beside it, each synced to disk. A graph that fails the
    check goes to ``<stem>.rejected.onnx`` (+ ``.json``) instead, and an earlier ``out`` is left as it
    was. The shapes are the sample's (batch of one, the config's cameras and image size), except the
    number of pillars, which is dynamic. Returns the description.
    """
    from bevkit.engine.data import BEVDataModule, history_frames

    require_exporter(opset)
    if not math.isfinite(tolerance) or tolerance <= 0:
        raise ConfigError(f"export: the tolerance must be a positive number, got {tolerance}")
    out = Path(out)
    split = split or cfg.data.val_split
    history = history_frames(cfg)
    model = model.eval().cpu()
    inputs = graph_inputs(model, history)
    ds = BEVDataModule(cfg).dataset(split, train=False)
    batch = example_batch(cfg, model, split, sample, ds)
    args = graph_args(batch, inputs)
    with torch.no_grad():
        names_out = list(flatten_outputs(model(batch), bool(history)))
    graph = ExportGraph(model, inputs, batch_size=1, history=history).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_json = out.with_name(f".{out.name}.json.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        _export(graph, args, tmp, names_out, opset)
        export_s = time.perf_counter() - t0
        got_opset = written_opset(tmp)
        if opset is not None and got_opset != opset:
            raise ConfigError(f"--opset {opset}: the exporter wrote opset {got_opset}")
        # The exported sample, and the next one (other images, poses and pillars through the same graph).
        checked = [sample] + ([sample + 1] if sample + 1 < len(ds) else [])
        checks = [parity(tmp, model, batch if i == sample else example_batch(cfg, model, split, i, ds), inputs,
                         history) for i in checked]
        worst = max(c["max_rel_diff"] for c in checks)
        unmatched = sum(c.get("decoded", {}).get("unmatched", 0) for c in checks)
        raw_ok = worst <= tolerance
        ok = raw_ok and unmatched == 0
        final = out if ok else out.with_name(f"{out.stem}.rejected{out.suffix or '.onnx'}")
        report = {
            "model": cfg.model.name, "onnx": final.name, "bytes": tmp.stat().st_size, "export_s": export_s,
            "opset": got_opset, "sample": {"split": split, "index": sample, "token": batch["token"][0]},
            "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""),
                        "meaning": INPUT_DOC[n]} for n, a in zip(inputs, args)],
            "outputs": list(names_out), "dynamic": ["pillar_features", "pillar_coords", "pillar_counts"]
            if "pillar_features" in inputs else [],
            "parity": {"samples": checked, "max_rel_diff": worst, "decoded_unmatched": unmatched,
                       "per_sample": checks},
            "tolerance": tolerance, "raw_ok": raw_ok, "ok": ok,
            "config": cfg.model_dump(mode="json"),
        }
        write_text_atomic(tmp_json, json.dumps(_json_safe(report), indent=2))  # fails before anything moves
        os.replace(tmp, final)
        os.replace(tmp_json, final.with_name(final.name + ".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
    return report


def _json_safe(value):
    """``value`` with non-finite floats as strings ("inf", "nan"): strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
