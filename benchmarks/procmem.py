"""Process memory for the benchmarks: /proc status fields, the high-water-mark reset, a watched child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

GIB = 1024**3


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak() -> int:
    """Reset this process's resident high-water mark (``VmHWM``) to its current resident set; returns
    that resident set in KiB (the "before" of a step whose peak is ``status_kib("VmHWM")`` after it)."""
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    return before


def run_watched(cmd: list[str], max_rss_gb: float, timeout: float) -> dict:
    """Run ``cmd`` (one torch thread) and return the JSON it prints on a ``RESULT `` line. A child whose
    resident set passes ``max_rss_gb`` or that runs past ``timeout`` seconds is killed; then, or when it
    prints no result, returns ``{"error", "max_rss_seen_gib", "wall_s"}``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0, max_rss, stopped = time.time(), 0, None
    while proc.poll() is None:
        try:
            max_rss = max(max_rss, status_kib("VmRSS", proc.pid))
        except (FileNotFoundError, RuntimeError, ProcessLookupError):
            pass
        if max_rss * 1024 > max_rss_gb * GIB:
            stopped = f"stopped: resident set above {max_rss_gb} GiB"
        elif time.time() - t0 > timeout:
            stopped = f"stopped: still running after {timeout:.0f} s"
        if stopped:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": stopped or (stderr.strip().splitlines() or ["no output"])[-1],
            "max_rss_seen_gib": max_rss * 1024 / GIB, "wall_s": time.time() - t0}
