"""``bevkit demo`` end to end on the tiny world (placed where the demo looks for its dataset)."""

import json
import os

from PIL import Image

from bevkit.cli import main


def test_demo_trains_evaluates_and_draws(tiny_root, tmp_path, index_cache, capsys, monkeypatch):
    monkeypatch.setenv("BEVKIT_CACHE", str(index_cache))
    out = tmp_path / "demo"
    out.mkdir()
    os.symlink(tiny_root, out / "synth-mini", target_is_directory=True)  # "using the dataset in ..."
    code = main(["demo", "--out", str(out), "--epochs", "1", "--set", "data.workers=0", "--set",
                 "train.threads=1"])
    text = capsys.readouterr().out
    assert code == 0, text[-2000:]
    assert "[demo] 1/5 using the dataset" in text and "[demo] 5/5 drew" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) >= {"untrained", "trained", "config", "minutes"}
    assert 0 <= summary["untrained"]["mAP"] <= 1 and 0 <= summary["trained"]["NDS"] <= 1
    metrics = json.loads((out / "train" / "eval-mini_val" / "metrics_summary.json").read_text())
    assert metrics["mean_ap"] == summary["trained"]["mAP"] and metrics["nd_score"] == summary["trained"]["NDS"]
    assert (out / "untrained" / "metrics_summary.json").is_file()
    assert (out / "train" / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((out / "train" / "results_mini_val.json").read_text())["results"]
    assert len(results) == 6
    pngs = sorted((out / "predictions").glob("*.png"))
    assert len(pngs) == 2  # two keyframes of the one mini_val scene
    for png in [*pngs, out / "preview.png"]:
        with Image.open(png) as im:
            assert im.size[0] > 400 and im.size[1] > 200
            assert len(set(im.convert("L").resize((64, 32)).getdata())) > 10  # drawn, not blank
