"""``bevkit score`` on the command line: scores, or one clear line and exit code 2 (never a traceback)."""

import copy
import json

from bevkit.eval.perturb import make_results


def run(argv, capsys):
    from bevkit.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_score_prints_the_summary_and_writes_files(tables, tiny_root, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(make_results(tables, "mini_val", "jitter", seed=0)))
    code, out, err = run(["score", str(path), "--data", str(tiny_root), "--version", "v1.0-mini", "--split",
                          "mini_val", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "mAP:" in out and "NDS:" in out
    assert (tmp_path / "out" / "metrics_summary.json").is_file()
    assert "capped" not in out


def test_score_with_a_range_cap_says_it_is_not_the_benchmark(tables, tiny_root, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(make_results(tables, "mini_val", "jitter", seed=0)))
    code, out, err = run(["score", str(path), "--data", str(tiny_root), "--version", "v1.0-mini", "--split",
                          "mini_val", "--max-range", "20", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "Class ranges capped at 20 m" in out
    saved = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert max(saved["cfg"]["class_range"].values()) == 20


def test_bad_results_file_is_one_line_and_exit_2(tables, tiny_root, tmp_path, capsys):
    data = make_results(tables, "mini_val", "jitter", seed=0)
    bad = copy.deepcopy(data)
    token = next(t for t, b in bad["results"].items() if b)
    bad["results"][token][0]["detection_name"] = "spaceship"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(bad))
    code, out, err = run(["score", str(path), "--data", str(tiny_root), "--version", "v1.0-mini", "--split",
                          "mini_val"], capsys)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert token in err and "detection_name" in err
