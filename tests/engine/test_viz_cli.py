"""`bevkit viz` on a trained detector: one PNG per sample, one-line errors."""

from pathlib import Path

from PIL import Image

from bevkit.cli import main


def test_viz_cli_draws_the_samples_asked_for(trained_run, tmp_path, capsys):
    cfg_path, ckpt = trained_run
    out = tmp_path / "det"
    assert main(["viz", cfg_path, str(ckpt), "--sample", "0", "--sample", "2", "--out", str(out)]) == 0
    written = [line.split("wrote ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert len(written) == 2 and len(set(written)) == 2
    assert all(Path(p).parent == out and Image.open(p).size[0] > 400 for p in written)
    assert not list(out.glob(".*"))  # no temporary file left
    for extra, message in ((["--sample", "99"], "not in split 'mini_val'"),
                           (["--out", cfg_path], "is not a folder")):
        assert main(["viz", cfg_path, str(ckpt), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
