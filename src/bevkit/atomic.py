"""Atomic file writes: a temporary name in the same folder, fsync, rename (the old file or the new one)."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the previous file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it to the handler that was installed
    (Python's default raises ``KeyboardInterrupt``).

    For ``torch.save`` to a file: its zip writer is C++ calling the file's ``write``, and an interrupt
    raised inside that call unwinds through it, closes the file, and the writer's cleanup then writes
    to the closed file, which aborts the process. Outside the main thread (where signals are not
    delivered) the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt
