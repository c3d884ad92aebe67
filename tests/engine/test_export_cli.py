"""`bevkit export` on a trained PointPillars model: the pillars are a dynamic input, decoded boxes match."""

import json

import pytest
import torch

from bevkit.cli import main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_cli_writes_a_graph_that_matches_pytorch(trained_run, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    out = tmp_path / "pp.onnx"
    assert main(["export", cfg_path, str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input  pillar_features" in printed and "dim 0 dynamic" in printed and "[torch.onnx]" not in printed
    rep = json.loads((tmp_path / "pp.onnx.json").read_text())
    assert rep["ok"] and rep["parity"]["max_rel_diff"] < 1e-5
    decoded = [c["decoded"] for c in rep["parity"]["per_sample"]]
    assert sum(d["boxes_torch"] for d in decoded) > 0
    assert all(d["unmatched"] == 0 and d["at_cutoff"] == 0 for d in decoded)

    # Another sample, with another number of pillars, through the same graph.
    from bevkit.config import load_experiment
    from bevkit.export import example_batch, flatten_outputs, graph_args, graph_inputs, load_trained, nest

    cfg = load_experiment(cfg_path)
    model = load_trained(cfg, ckpt)
    batch = example_batch(cfg, model, "mini_val", 3)
    names = graph_inputs(model, 0)
    args = graph_args(batch, names)
    assert args[0].shape[0] != rep["inputs"][0]["shape"][0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {n: a.numpy() for n, a in zip(names, args)})))
    with torch.no_grad():
        ref = flatten_outputs(model(batch), temporal=False)
    for name, value in ref.items():
        assert (torch.from_numpy(got[name]) - value).abs().max() <= 1e-5 * value.abs().max() + 1e-7, name
    boxes = model.heads["detection"].decode(nest(got)["detection"])[0]["boxes"]
    torch.testing.assert_close(boxes, model.decode(model(batch))["detection"][0]["boxes"], rtol=0, atol=1e-4,
                               equal_nan=True)

    # A tolerance no float graph meets: exit 1, the graph kept aside for inspection, the good file untouched.
    before = out.read_bytes()
    assert main(["export", cfg_path, str(ckpt), "--out", str(out), "--tolerance", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "more than --tolerance" in err and "pp.rejected.onnx" in err
    assert (tmp_path / "pp.rejected.onnx").is_file() and out.read_bytes() == before
    assert json.loads((tmp_path / "pp.rejected.onnx.json").read_text())["ok"] is False


def test_export_cli_errors_are_one_line(trained_run, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    assert main(["export", cfg_path, str(ckpt), "--out", str(tmp_path / "a.onnx"), "--sample", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sample 99 is not in split 'mini_val'" in err
    assert main(["export", cfg_path, str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a.onnx")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["export", cfg_path, str(ckpt), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", cfg_path, str(ckpt), "--out", str(tmp_path / "a.onnx"), "--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--opset 13" in err
    assert main(["export", cfg_path, str(ckpt), "--out", str(tmp_path / "a.onnx"), "--tolerance", "inf"]) == 2
    assert "--tolerance must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()
