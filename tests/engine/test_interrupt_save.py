"""Ctrl-C during a checkpoint write: the write finishes, the file is whole, then the interrupt is raised."""

import os
import signal

import pytest
import torch

import bevkit.engine.runner as runner
from bevkit.atomic import interrupts_deferred


def test_interrupts_are_held_until_the_block_ends():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append("after the signal")  # not interrupted here
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_ctrl_c_in_the_middle_of_a_checkpoint_write_leaves_it_whole(tmp_path, monkeypatch):
    real_save = torch.save

    def save_interrupted(obj, f):  # the signal arrives while torch.save runs
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f)

    monkeypatch.setattr(runner.torch, "save", save_interrupted)
    path = tmp_path / "last.ckpt"
    with pytest.raises(KeyboardInterrupt):
        runner.AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(runner.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
