"""bevkit preview: a damaged LiDAR file or an --out that cannot be written is one line, leaving nothing behind."""

import json
import os
import shutil
from pathlib import Path

import pytest

from bevkit.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, needle):
    assert code == 2 and err.startswith("bevkit: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err


def test_truncated_lidar_file(tiny_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    sd = next(r for r in json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
              if r["is_key_frame"] and r["filename"].endswith(".pcd.bin"))
    with open(root / sd["filename"], "r+b") as f:
        f.truncate(12345)
    out = tmp_path / "out" / "p.png"
    code, _, err = _run(capsys, "preview", str(root), "--sample", sd["sample_token"], "--out", str(out))
    _one_line_error(code, err, f"{root / sd['filename']}: 12345 bytes is not a whole number")
    assert not out.parent.exists()


def test_out_is_a_folder(tiny_root, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    code, _, err = _run(capsys, "preview", str(tiny_root), "--out", str(folder))
    _one_line_error(code, err, f"{folder}: is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures"] and not any(folder.iterdir())


def test_out_in_a_folder_that_cannot_be_made(tiny_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "preview", str(tiny_root), "--out", str(tmp_path / "file" / "p.png"))
    _one_line_error(code, err, "cannot create the folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_that_cannot_be_written(tiny_root, capsys):
    code, _, err = _run(capsys, "preview", str(tiny_root), "--out", "/proc/x.png")
    _one_line_error(code, err, "/proc/x.png: cannot write the preview")


def test_a_failed_write_leaves_no_temporary_file(tiny_root, tmp_path, capsys, monkeypatch):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    out = tmp_path / "p.png"
    code, _, err = _run(capsys, "preview", str(tiny_root), "--out", str(out))
    _one_line_error(code, err, f"{out}: cannot write the preview (No space left on device)")
    assert list(tmp_path.iterdir()) == []
