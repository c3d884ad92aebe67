"""Latency per stage, throughput, peak memory, FLOPs and parameters of a model on dataset samples."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from bevkit.bench.flops import SparseProductCounter

# The model's components in the order a forward pass runs them (``heads`` is timed per head).
STAGES = ("backbone", "neck", "view_transform", "lidar", "fuser", "temporal", "map_prior", "bev_encoder")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall time spent inside each top-level component of a ``BEVModel`` (and each head), through
    forward pre- and post-hooks; on CUDA each boundary synchronises the device, so a stage's time is
    its kernels' time. Only calls made while ``recording`` is True are counted; a component called
    more than once in a pass adds up."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.recording = False
        self.seconds: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._handles = []
        named = [(name, getattr(model, name, None)) for name in STAGES]
        named += [(f"heads.{name}", head) for name, head in model.heads.items()]
        self.stages = [name for name, module in named if module is not None]
        for name, module in named:
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(module, args):
            if self.recording:
                _sync(self.device)
                self._start[name] = time.perf_counter()
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            if self.recording and name in self._start:
                _sync(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start.pop(name)
        return hook

    def take(self) -> dict[str, float]:
        """The seconds counted since the last call, per stage (0 for a stage not called)."""
        out = {name: self.seconds.get(name, 0.0) for name in self.stages}
        self.seconds = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _autocast(device: torch.device, precision: str):
    if precision == "32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _live_peak_bytes(events: list[dict]) -> int:
    """Peak of the running sum of the profiler's ``[memory]`` allocation events (bytes, in order)."""
    live = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["args"]["Ev Idx"]):
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    return peak


@contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block (what C++ code prints there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device: torch.device) -> dict:
    """Peak memory of the tensors ``fn()`` allocates beyond those alive before it: on CUDA the
    allocator's ``max_memory_allocated``; on the CPU the peak of live tensor bytes from the
    profiler's allocation events (the same quantity, without the C allocator's caching or page
    faults). Also the process's resident-set high-water mark (``VmHWM``, Linux) after the call."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        kind = "torch.cuda.max_memory_allocated beyond the tensors alive before"
    else:
        import json
        import tempfile

        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _native_stderr_silenced():  # the profiler's C++ start and stop notices
            prof.__enter__()
        try:
            fn()
        finally:
            with _native_stderr_silenced():
                prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        peak = _live_peak_bytes(events) / 2**20
        kind = "peak of live tensor bytes allocated in one iteration (profiler allocation events)"
    hwm = _rss_kib("VmHWM")
    return {"peak_mib": peak, "kind": kind, "process_peak_rss_mib": None if hwm is None else hwm / 1024}


def _stats(values: list[float]) -> dict:
    ms = [1e3 * v for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def parameters(model: nn.Module) -> dict:
    """Parameters per top-level component and in total, in millions (None: the model has no such part)."""
    out = {}
    for name in (*STAGES, "heads"):
        module = getattr(model, name, None)
        out[name] = None if module is None else sum(p.numel() for p in module.parameters()) / 1e6
    out["total"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


def count_flops(model: nn.Module, batch: dict, precision: str = "32") -> dict:
    """GFLOPs of one forward pass (``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add),
    in total and per component, with the sparse products counted as what they are.

    The counter has no rule for the weighted ``embedding_bag`` sums of ``ops.bev_pool`` and
    ``ops.deform_attn`` (it counts 0) and counts a product with a sparse matrix as if it were dense;
    :class:`SparseProductCounter` sees those calls: ``counted`` is the counter's total,
    ``sparse_as_dense`` what it counted for the sparse products, ``sparse_true`` 2 per stored entry and
    column, and ``gflops`` = counted - sparse_as_dense + sparse_true."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    sparse = SparseProductCounter()
    device = next(model.parameters()).device
    with torch.no_grad(), _autocast(device, precision), counter, sparse:
        model(batch)
    counts = counter.get_flop_counts()

    def total(prefix: str) -> float:
        names = [prefix] if prefix in counts else [k for k in counts if k.startswith(prefix + ".")
                                                   and "." not in k[len(prefix) + 1:]]
        return sum(v for n in names for v in counts[n].values()) / 1e9

    counted = total("Global")
    return {"gflops": counted - sparse.as_dense / 1e9 + sparse.flops / 1e9, "counted": counted,
            "sparse_as_dense": sparse.as_dense / 1e9, "sparse_true": sparse.flops / 1e9,
            "by_component_counted": {name: total(f"BEVModel.{name}")
                                     for name in (*STAGES, "heads") if getattr(model, name, None) is not None}}


def bench_model(model: nn.Module, batch: dict, repeats: int = 20, warmup: int = 3, precision: str = "32",
                flops: bool = True, progress: bool = False) -> dict:
    """Time what evaluation runs on ``batch`` (a collated batch with ``history`` when the model reads
    previous frames), ``repeats`` times after ``warmup`` untimed runs, on the model's device.

    One iteration is: the history frames encoded into ``prev_bev`` (``history``), the forward pass
    (``forward``, split into the model's components by hooks, ``other`` being the rest: camera
    geometry, glue) and the heads' decoding (``decode``: top-k, NMS, thresholds); ``total`` is their
    sum. A map prior reads an empty prior (the global memory's read and write are not timed).
    ``fps`` is samples per second at the median total. Then one more iteration measures the peak
    memory (:func:`peak_memory`), and one forward pass the FLOPs (:func:`count_flops`).

    Returns a JSON-able dict (times in milliseconds).
    """
    from bevkit.engine.module import with_history

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be at least 1 and warmup at least 0, got {repeats} and {warmup}")
    device = next(model.parameters()).device
    model.eval()
    timer = StageTimer(model, device)
    size = len(batch["token"]) if "token" in batch else 1

    def once(record: bool) -> dict:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(device, precision):
            run = with_history(model, batch)
            run.pop("history", None)
            _sync(device)
            t1 = time.perf_counter()
            timer.recording = record  # the components of this frame's forward only, not the history's
            out = model(run)
            timer.recording = False
            _sync(device)
            t2 = time.perf_counter()
            model.decode(out)
        _sync(device)
        t3 = time.perf_counter()
        return {"history": t1 - t0, "forward": t2 - t1, "decode": t3 - t2, "total": t3 - t0, **timer.take()}

    try:
        from tqdm.auto import tqdm

        for _ in tqdm(range(warmup), desc="warm-up", disable=not progress or warmup == 0, leave=False):
            once(False)
        runs = [once(True) for _ in tqdm(range(repeats), desc="timing", disable=not progress, leave=False)]
    finally:
        timer.remove()
    for r in runs:
        r["other"] = r["forward"] - sum(r[s] for s in timer.stages)
    keys = ["total", "history", "forward", *timer.stages, "other", "decode"]
    latency = {k: _stats([r[k] for r in runs]) for k in keys}
    memory = peak_memory(lambda: once(False), device)
    report = {
        "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
        "batch": size, "repeats": repeats, "warmup": warmup,
        "latency_ms": latency, "fps": size / (latency["total"]["median"] / 1e3),
        "memory": memory, "params_m": parameters(model),
        "flops": None,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    if flops:
        with torch.no_grad():
            run = with_history(model, batch)
        run.pop("history", None)
        report["flops"] = count_flops(model, run, precision)
    return report


def bench_input(cfg, model: nn.Module, split: str, sample: int, batch: int, device: torch.device) -> tuple[dict, dict]:
    """Samples ``sample`` .. ``sample + batch - 1`` of ``split`` collated as evaluation reads them (no
    augmentation, with the history frames the model reads), on ``device``, and a description of them."""
    from bevkit.config import ConfigError
    from bevkit.engine.data import BEVDataModule, collate_history, history_frames, to_device

    ds = BEVDataModule(cfg).dataset(split, train=False)
    if batch < 1:
        raise ConfigError(f"bench: --batch must be at least 1, got {batch}")
    if not 0 <= sample or sample + batch > len(ds):
        raise ConfigError(f"bench: samples {sample}..{sample + batch - 1} are not all in split {split!r} "
                          f"({len(ds)} samples)")
    items = [ds[i] for i in range(sample, sample + batch)]
    collated = to_device(collate_history(items), device)
    info = {"split": split, "first_sample": sample, "tokens": [it["token"] for it in items],
            "cameras": len(cfg.data.cameras) if model.view_transform is not None else 0,
            "image_size": list(cfg.data.image_size) if model.view_transform is not None else None,
            "points": [int(len(p)) for p in collated["points"]] if "points" in collated else None,
            "history_frames": history_frames(cfg)}
    return collated, info
