"""Whole models exported to ONNX (in-graph geometry, exportable ops) match PyTorch in onnxruntime."""

import json

import pytest
import torch

from bevkit.config import ConfigError, load_experiment
from bevkit.engine.checkpoint import build_experiment_model
from bevkit.export import compare_detections, export_onnx, flatten_outputs, graph_args, nest
from bevkit.export.onnx import output_difference
from bevkit.models.view_transforms import inverse_3x3

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str, root, out):
    cfg = load_experiment(f"configs/{preset}.yaml", [f"data.root={root}", "data.train_split=mini_train",
                                                     "data.val_split=mini_val", "data.workers=0", f"out={out}"])
    torch.manual_seed(0)
    return cfg, build_experiment_model(cfg, load_checkpoint=False).eval()


def _run(path, feeds: dict) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feeds.items()})))


def test_inverse_3x3_matches_linalg():
    m = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(0),
                                                               dtype=torch.float64)
    torch.testing.assert_close(inverse_3x3(m), torch.linalg.inv(m), rtol=1e-10, atol=1e-10)


def test_nest_inverts_flatten():
    out = {"bev": torch.zeros(1), "features": torch.ones(2), "depth": torch.ones(3),
           "detection": [{"heatmap": torch.full((1,), 3.0), "offset": torch.full((2,), 4.0)}],
           "map": torch.full((1,), 5.0)}
    flat = flatten_outputs(out, temporal=False)
    assert list(flat) == ["features", "detection.0.heatmap", "detection.0.offset", "map"]  # no depth, no bev
    back = nest({k: v.numpy() for k, v in flat.items()})
    assert torch.equal(back["detection"][0]["offset"], out["detection"][0]["offset"])
    assert torch.equal(back["map"], out["map"])


def test_lift_splat_model_exports_with_camera_matrices_as_inputs(tiny_root, tmp_path):
    cfg, model = _model("bevdet-synth", tiny_root, tmp_path / "run")
    rep = export_onnx(cfg, model, tmp_path / "bevdet.onnx")
    # (Decoded boxes are compared with a trained model in tests/engine: the near-equal scores of random
    # weights let circle NMS keep either of two neighbours, which can send the graph to .rejected.onnx.)
    path = tmp_path / rep["onnx"]
    assert rep["raw_ok"] and rep["parity"]["max_rel_diff"] < 1e-5 and rep["opset"] >= 18
    assert rep["parity"]["samples"] == [0, 1]
    assert [i["name"] for i in rep["inputs"]] == ["images", "intrinsics", "img_aug", "ego_from_cam"]
    assert json.loads((tmp_path / (rep["onnx"] + ".json")).read_text())["outputs"] == rep["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left

    # The geometry is computed in the graph: a mirrored image augmentation and a rotated BEV (another
    # frustum, other cells) give what the PyTorch model gives for them.
    from bevkit.export import example_batch

    batch = example_batch(cfg, model, "mini_val", 0)
    flip = torch.tensor([[-1.0, 0.0, 175.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch["img_aug"] = flip @ batch["img_aug"]
    batch["images"] = batch["images"].flip(-1)
    c, s = torch.cos(torch.tensor(0.3)), torch.sin(torch.tensor(0.3))
    batch["bev_aug"] = torch.tensor([[[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    got = _run(path, dict(zip(["images", "intrinsics", "img_aug", "ego_from_cam"],
                              graph_args(batch, ["images", "intrinsics", "img_aug", "ego_from_cam"]))))
    with torch.no_grad():
        ref = flatten_outputs(model(batch), temporal=False)
    assert ref["features"].abs().max() > 0
    for name, value in ref.items():
        diff = (torch.from_numpy(got[name]) - value).abs().max()
        assert diff <= 1e-5 * value.abs().max() + 1e-7, name


def test_bevformer_exports_with_its_history(tiny_root, tmp_path):
    cfg, model = _model("bevformer-synth", tiny_root, tmp_path / "run")
    rep = export_onnx(cfg, model, tmp_path / "bevformer.onnx")
    assert rep["ok"] and rep["parity"]["max_rel_diff"] < 1e-5  # the DETR head has no NMS: boxes pair up
    names = [i["name"] for i in rep["inputs"]]
    assert names[-3:] == ["prev_bev", "curr_from_prev", "prev_valid"]
    assert rep["outputs"][:2] == ["bev", "features"]  # the state the next frame reads comes out

    # prev_valid False: the queries stand in for the history, as PyTorch does without prev_bev.
    from bevkit.export import example_batch

    batch = example_batch(cfg, model, "mini_val", 0)
    feeds = dict(zip(names, graph_args(batch, names)))
    feeds["prev_bev"] = torch.randn_like(feeds["prev_bev"])  # ignored
    feeds["prev_valid"] = torch.zeros(1, dtype=torch.bool)
    got = _run(tmp_path / "bevformer.onnx", feeds)
    alone = {k: v for k, v in batch.items() if k not in ("prev_bev", "curr_from_prev")}
    with torch.no_grad():
        ref = flatten_outputs(model(alone), temporal=True)
        with_history = model(batch)["features"]
    assert (ref["features"] - with_history).abs().max() > 1e-3  # the history matters here
    for name, value in ref.items():
        assert (torch.from_numpy(got[name]) - value).abs().max() <= 1e-5 * value.abs().max() + 1e-7, name


def test_sparse_voxel_lidar_is_refused(tiny_root, tmp_path):
    cfg, model = _model("bevfusion-synth", tiny_root, tmp_path / "run")
    with pytest.raises(ConfigError, match="no exportable form"):
        export_onnx(cfg, model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_compare_detections_tells_ties_from_differences():
    box = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 3.14159, float("nan"), 0.0]])

    def dets(boxes, scores, labels):
        return {"boxes": boxes, "scores": torch.tensor(scores), "labels": torch.tensor(labels)}

    same = dets(box.clone(), [0.9], [0])
    wrapped = box.clone()
    wrapped[0, 6] = -3.14159 + 1e-5  # the same heading across +-pi
    assert compare_detections([same], [dets(wrapped, [0.9], [0])])["unmatched"] == 0
    # A missing box, a NaN box against a number, another score: each a difference.
    assert compare_detections([dets(box.repeat(2, 1), [0.9, 0.3], [0, 1])], [same])["unmatched"] == 1
    assert compare_detections([dets(torch.full_like(box, float("nan")), [0.9], [0])], [same])["unmatched"] == 2
    assert compare_detections([dets(box.clone(), [0.2], [0])], [same])["unmatched"] == 2
    # One to one: [A, A] against [A, B] leaves one A and B over.
    other = box.clone()
    other[0, 0] += 5.0
    rep = compare_detections([dets(box.repeat(2, 1), [0.9, 0.9], [0, 0])],
                             [dets(torch.cat([box, other]), [0.9, 0.9], [0, 0])])
    assert rep["unmatched"] == 2
    # Ties: at the score threshold, or at the lowest score of a side that holds max_boxes.
    low = dets(other, [0.1 + 1e-6], [0])
    assert compare_detections([low], [dets(box[:0], [], [])], threshold=0.1)["at_cutoff"] == 1
    full = dets(box.clone(), [0.5], [0])
    rep = compare_detections([dets(other, [0.5], [0])], [full], max_boxes=1)
    assert rep["at_cutoff"] == 2 and rep["unmatched"] == 0
    assert compare_detections([dets(other, [0.5], [0])], [full])["unmatched"] == 2  # not full: a difference
    with pytest.raises(ValueError, match="samples"):
        compare_detections([same, same], [same])


def test_a_nan_in_the_graph_output_fails_the_check():
    ok = output_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]))
    assert ok["rel_diff"] < 1e-6 and ok["mismatched_finite"] == 0
    bad = output_difference(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert bad["rel_diff"] == float("inf") and bad["mismatched_finite"] == 1
    both = output_difference(torch.tensor([float("inf"), 2.0]), torch.tensor([float("inf"), 2.0]))
    assert both["rel_diff"] == 0.0  # the same infinity on both sides is agreement
