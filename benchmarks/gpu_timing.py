"""GPU timing shared by the benchmark scripts: the median time of a callable by CUDA events, and
the time per kernel (or per host-side op) of a few calls by the torch profiler."""
from __future__ import annotations

import statistics
import time

import torch

SLEEP_CYCLES = 40_000_000  # ~20 ms of a ~2 GHz GPU's clock


def bench(fn, warmup: int = 2, iters: int = 10, budget_s: float = 20.0,
          queued: bool = False) -> tuple[float, int]:
    """(median milliseconds of fn() by CUDA events after warm-up, timed calls). Stops once budget_s
    of wall time is spent, counted from the end of the first warm-up call (which may compile and
    autotune), after at least one timed call. queued: each timed call is issued while the GPU runs
    a ~20 ms sleep kernel, so that the events time the GPU's work alone, not the host's time to
    issue it (a call whose host time exceeds the sleep is timed from where the sleep ends)."""
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
        if queued:
            torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times), len(times)


def kernel_table(*calls, rows: int = 14, host: bool = False) -> str:
    """GPU time per kernel of one run of each call (after one untimed run), as the profiler's
    table sorted by time: which kernels bound a step. A kernel launched with PDL (`ops/pdl.py`)
    starts while the one ahead of it finishes, and its time includes that wait: the times can sum
    to more than the wall time. host=True: CPU time per op instead (custom ops and kernel launches
    included), for a step whose launches outlast its kernels."""
    from torch.profiler import ProfilerActivity, profile

    for call in calls:
        call()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] if host else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for call in calls:
            call()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total" if host else "cuda_time_total", row_limit=rows,
                                     max_name_column_width=48)
