"""`bevkit cache` on the command line: the sub-commands and one-line errors."""

import pytest

from bevkit.cli import main


def test_cache_help_lists_the_sub_commands(capsys):
    assert main(["cache", "--help"]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "merge" in out and "write" in out


@pytest.mark.parametrize("argv, needle", [
    (["cache", "verify", "{tmp}/nothing"], "no manifest.json"),
    (["cache", "merge", "{tmp}"], "no shard manifests"),
    (["cache", "cfg.yaml", "x.ckpt", "--out", "{tmp}/c", "--shard", "2/2"], "--shard '2/2'"),
    (["cache", "cfg.yaml", "x.ckpt", "--out", "{tmp}/c", "--shard", "one"], "expected I/N"),
    (["cache", "{tmp}/missing.yaml", "x.ckpt", "--out", "{tmp}/c"], "no such config file"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bevkit: error:") and err.count("\n") == 1 and needle in err, err


def test_merge_names_what_is_missing(tiny_model, tmp_path, capsys):
    from cache_helpers import SPLIT

    cfg_path, ckpt = tiny_model
    out = tmp_path / "c"
    assert main(["cache", cfg_path, str(ckpt), "--split", SPLIT, "--out", str(out), "--shard", "1/2"]) == 0
    assert "manifest.json follows when every shard is done" in capsys.readouterr().out
    assert main(["cache", "merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 of 6 samples not cached yet" in err and "shard manifests present: 1/2" in err
    assert main(["cache", "verify", str(out), "--no-progress"]) == 0
    assert "unfinished" in capsys.readouterr().out


def test_a_damaged_manifest_is_one_line(reference_cache, tmp_path, capsys):
    import json
    import shutil

    ref, _ = reference_cache
    out = tmp_path / "c"
    shutil.copytree(ref, out)
    doc = json.loads((out / "manifest.json").read_text())
    del doc["entries"][2]["sha256"]
    (out / "manifest.json").write_text(json.dumps(doc))
    assert main(["cache", "verify", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged manifest, entries[2] has no sha256" in err, err
