"""The command line: one-line errors with exit code 2, and the commands' outputs."""

from PIL import Image

from bevkit.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep")
    code, _, err = _run(capsys, "synth", str(tmp_path), "--preset", "tiny")
    assert code == 2
    assert err.strip().count("\n") == 0 and "not empty" in err and "--overwrite" in err
    assert (tmp_path / "x.txt").read_text() == "keep"


def test_bad_option_values_get_one_line(tmp_path, capsys):
    for argv, needle in ((["--preset", "huge"], "unknown preset"), (["--scale", "3"], "image scale"),
                         (["--seed", "abc"], "--seed"), (["--workers", "0"], "--workers"),
                         (["--lidar-hz", "7"], "lidar rate")):
        code, _, err = _run(capsys, "synth", str(tmp_path / "new"), *argv)
        assert code == 2, argv
        assert "Traceback" not in err and err.startswith("bevkit: error:") and needle in err, err
        assert err.strip().count("\n") == 0
    assert not (tmp_path / "new").exists()


def test_preview_writes_a_png(tiny_root, tmp_path, capsys):
    out = tmp_path / "p.png"
    code, stdout, _ = _run(capsys, "preview", str(tiny_root), "--sample", "7", "--out", str(out))
    assert code == 0 and str(out) in stdout
    with Image.open(out) as im:
        assert im.size[0] > 1000 and im.size[1] > 300


def test_preview_bad_input(tiny_root, tmp_path, capsys):
    code, _, err = _run(capsys, "preview", str(tmp_path / "missing"))
    assert code == 2 and "no such dataset folder" in err
    code, _, err = _run(capsys, "preview", str(tiny_root), "--sample", "500")
    assert code == 2 and "out of range" in err
    code, _, err = _run(capsys, "preview", str(tiny_root), "--sample", "f" * 32)
    assert code == 2 and "no record with token" in err
