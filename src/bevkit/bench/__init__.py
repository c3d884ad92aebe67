"""Model benchmarks (``bevkit bench``): latency per stage, throughput, memory, FLOPs, parameters."""

from bevkit.bench.flops import SparseProductCounter
from bevkit.bench.profile import STAGES, StageTimer, bench_input, bench_model, count_flops, parameters

__all__ = ["STAGES", "SparseProductCounter", "StageTimer", "bench_input", "bench_model", "count_flops", "parameters"]
