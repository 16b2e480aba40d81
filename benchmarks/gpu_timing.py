"""Median GPU time of a callable, by CUDA events (shared by the GPU benchmark scripts)."""
from __future__ import annotations

import statistics
import time

import torch


def bench(fn, warmup: int = 2, iters: int = 10, budget_s: float = 20.0) -> tuple[float, int]:
    """(median milliseconds of fn() by CUDA events after warm-up, timed calls). Stops once budget_s
    of wall time is spent, counted from the end of the first warm-up call (which may compile and
    autotune), after at least one timed call."""
    t_start = time.perf_counter()
    for i in range(warmup):
        fn()
        if i == 0:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times), len(times)
