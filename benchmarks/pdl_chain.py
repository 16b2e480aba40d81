"""What programmatic dependent launch (`mom_compile/ops/pdl.py`) saves a chain of small kernels
replayed from a CUDA graph, the shape of a decode step: per layer a small kernel, a state kernel
(384 programs, each updating a [256, 8] float32 slice, as `_decode_step_kernel` at batch 1), two
more small kernels, and optionally a one-row bf16 GEMM (cuBLAS) ahead of them; 24 layers.

Modes: off; "wait" (every kernel waits first, as `pdl.enter` without letting the next start);
"enter" (`pdl.enter`: wait, then let the next kernel start); "early" (as "enter", the state kernel
loading its slice before the wait, as the decode step does). Microseconds per replay of the chain:
the fastest of several rounds of 100 replays, the modes alternating.

    python benchmarks/pdl_chain.py [--rounds 5]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from tree_commit import tree_commit
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODES = ("off", "wait", "enter", "early")
LAYERS, PROGRAMS, K, BV = 24, 384, 256, 8


@triton.jit
def _small_kernel(x, y, n, WAIT: tl.constexpr, RELEASE: tl.constexpr, BLOCK: tl.constexpr):
    if WAIT:
        gdc_wait()
    if RELEASE:
        gdc_launch_dependents()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n) * 0.999 + 1.0, mask=i < n)


@triton.jit
def _state_kernel(states, x, y, WAIT: tl.constexpr, RELEASE: tl.constexpr, EARLY: tl.constexpr,
                  K: tl.constexpr, BV: tl.constexpr):
    tile = tl.program_id(0) * K * BV + tl.arange(0, K)[:, None] * BV + tl.arange(0, BV)[None, :]
    if EARLY:
        s = tl.load(states + tile)
    if WAIT:
        gdc_wait()
    if RELEASE:
        gdc_launch_dependents()
    if not EARLY:
        s = tl.load(states + tile)
    q = tl.load(x + tl.arange(0, K))
    s = s * 0.99 + q[:, None]
    tl.store(states + tile, s)
    tl.store(y + tl.program_id(0) * BV + tl.arange(0, BV), tl.sum(s * q[:, None], axis=0) * 1e-3)


def chain(mode: str, a, b, states, gemm) -> None:
    flags = dict(WAIT=mode != "off", RELEASE=mode in ("enter", "early"), launch_pdl=mode != "off")
    for layer in range(LAYERS):
        if gemm is not None:
            torch.mm(*gemm[:2], out=gemm[2])
        _small_kernel[(4,)](a, b, 4096, BLOCK=1024, **flags)
        _state_kernel[(PROGRAMS,)](states[layer], b, a, EARLY=mode == "early", K=K, BV=BV, num_warps=4,
                                   **flags)
        _small_kernel[(4,)](a, b, 4096, BLOCK=1024, **flags)
        _small_kernel[(4,)](b, a, 4096, BLOCK=1024, **flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: expected at least 1, got {args.rounds}")
    a, b = (torch.randn(PROGRAMS * BV + 4096, device="cuda") for _ in range(2))
    states = [torch.randn(PROGRAMS * K * BV, device="cuda") * 0.01 for _ in range(LAYERS)]
    gemm = (torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16),
            torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16),
            torch.empty(1, 3072, device="cuda", dtype=torch.bfloat16))
    graphs = {}
    for with_gemm in (False, True):
        for mode in MODES:
            for _ in range(3):
                chain(mode, a, b, states, gemm if with_gemm else None)
            torch.cuda.synchronize()
            graphs[with_gemm, mode] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[with_gemm, mode]):
                chain(mode, a, b, states, gemm if with_gemm else None)
    best = dict.fromkeys(graphs, float("inf"))
    for _ in range(args.rounds):
        for key, graph in graphs.items():
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            best[key] = min(best[key], start.elapsed_time(end) * 10)  # us per replay
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| commit {tree_commit()} | {LAYERS} layers, fastest of {args.rounds} rounds of 100 replays")
    print("| chain | " + " | ".join(MODES) + " |")
    print("| --- |" + " --- |" * len(MODES))
    for with_gemm in (False, True):
        name = "4 Triton kernels + a GEMM a layer" if with_gemm else "4 Triton kernels a layer"
        print(f"| {name} | " + " | ".join(f"{best[with_gemm, m]:.1f} us" for m in MODES) + " |")


if __name__ == "__main__":
    main()
