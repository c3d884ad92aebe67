"""`bevkit train / eval / predict` as a user runs them: outputs, official formats, one-line errors."""

import json

import pytest
import torch
from engine_helpers import tiny_experiment, write_yaml

from bevkit.cli import main
from bevkit.eval.score import score


def test_eval_and_predict_agree_with_score(trained_run, tiny_root, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    out = tmp_path / "eval"
    assert main(["eval", cfg_path, str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP:" in printed and "NDS:" in printed and "Per-class results:" in printed
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert {"mean_ap", "nd_score", "label_aps", "tp_errors", "mean_dist_aps"} <= set(summary)
    assert (out / "plots" / "car_pr.png").is_file()

    results = tmp_path / "results_nusc.json"
    assert main(["predict", cfg_path, str(ckpt), "--out", str(results)]) == 0
    sub = json.loads(results.read_text())
    assert set(sub["meta"]) == {"use_camera", "use_lidar", "use_radar", "use_map", "use_external"}
    assert sub["meta"]["use_lidar"] and not sub["meta"]["use_camera"]
    box = next(b for boxes in sub["results"].values() for b in boxes)
    assert set(box) == {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                        "detection_score", "attribute_name"}
    # The submission file, scored on its own, gives the figures `bevkit eval` printed.
    rescored = score(results, tiny_root, None, "mini_val")
    assert rescored["mean_ap"] == pytest.approx(summary["mean_ap"], abs=1e-9)
    assert rescored["nd_score"] == pytest.approx(summary["nd_score"], abs=1e-9)


def test_engine_errors_are_one_line(trained_run, tiny_root, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    doc = tiny_experiment(tiny_root, tmp_path / "run")
    doc["train"]["lr_max"] = 1.0
    bad = write_yaml(tmp_path / "bad.yaml", doc)
    assert main(["train", bad]) == 2
    err = capsys.readouterr().err
    assert "train.lr_max: unknown key" in err and err.count("\n") == 1

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["eval", cfg_path, str(cut)]) == 2
    err = capsys.readouterr().err
    assert "cut.ckpt" in err and err.count("\n") == 1

    # A config whose model differs from the checkpoint's is refused, naming the differing key.
    assert main(["eval", cfg_path, str(ckpt), "--set", "model.lidar.channels=16"]) == 2
    assert "model.lidar.channels" in capsys.readouterr().err
    # Decoding settings are not weights: they may be changed at evaluation, and change the predictions.
    out = {}
    for name, radii in (("a", "[2.0, 3.46, 3.16, 1.0, 0.92, 0.42]"), ("b", "[30.0, 30.0, 30.0, 30.0, 30.0, 30.0]")):
        assert main(["predict", cfg_path, str(ckpt), "--out", str(tmp_path / f"{name}.json"),
                     "--set", f"model.heads.detection.nms_radii={radii}",
                     "--set", "model.heads.detection.score_threshold=0.0"]) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    count = {k: sum(len(v) for v in r.values()) for k, r in out.items()}
    assert count["a"] > count["b"] > 0

    assert main(["train", cfg_path, "--resume", "--set", f"out={tmp_path / 'fresh'}"]) == 2
    assert "nothing to resume from" in capsys.readouterr().err
    # A run saved with another layout of a tensor (as before BEVFormer's per-camera embedding) is not
    # resumed (its optimizer state has the old shapes); the message says how to start from its weights.
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k, v in old["state_dict"].items() if k.startswith("model.") and v.dim() == 1 and v.numel() > 1)
    old["state_dict"][key] = old["state_dict"][key].view(1, -1)
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    torch.save(old, tmp_path / "old" / "checkpoints" / "last.ckpt")
    assert main(["train", cfg_path, "--resume", "--set", f"out={tmp_path / 'old'}"]) == 2
    err = capsys.readouterr().err
    assert key[len("model."):] in err and "train.init_from=" in err and err.count("\n") == 1

    # Settings only the model builder can check (an unknown variant) are one line too.
    assert main(["train", cfg_path, "--set", "model.bev_encoder.type=unet", "--set",
                 f"out={tmp_path / 'unet'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown BEV encoder 'unet'" in err and err.count("\n") == 1
