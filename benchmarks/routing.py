"""Dispatch and combine of one MoM layer: does a fused kernel have anything to win? Issue 3 asks
for a fused dispatch/combine wherever one beats stock torch, so this measures what stock torch
takes against the memory floor of the same work.

Shapes: the paper's 340M layer (H=4, head_dim 256, expand_v 1, M=4 top-2 + the shared memory,
so k = 3 rows per token), N tokens (default 32K) in sequences of T, o_rows bf16, weights float32.
Rows of the table:
  - dispatch: `mom::dispatch` (the B*T*k choices grouped by (sequence, memory) in time order: each
    row's token and memory, each choice's row and the segment offsets) and its stock-torch
    reference, each called and replayed from a CUDA graph (a graph-replayed prefill pays only the
    kernels and their launch gaps, a called op its host time too);
  - combine, forward and forward+backward, two ways: the `mom::combine` op as registered on CUDA
    (whatever kernel that is in this tree; the op is opaque to torch.compile), and the same formula
    in plain torch under torch.compile (Inductor fuses the gather, the weighting and the sum);
  - the floor of combine: the bytes it must move at the card's spec-sheet bandwidth (forward:
    o_rows and the weights in, y out; backward: d_y, o_rows and the weights in, d_rows and
    d_weights out).
Median ms over CUDA events.

    python benchmarks/routing.py [--tokens 32768] [--seq-len 2048]
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from gpu_timing import bench
from layer_floor import card_peaks
from tree_commit import tree_commit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mom_compile

from mom_compile import ops  # noqa: E402
from mom_compile.ops.dispatch import dispatch_reference  # noqa: E402


def plain_combine(o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor) -> torch.Tensor:
    """mom::combine's formula in stock torch, for Inductor to fuse."""
    return (o_rows[row_of_choice].to(weights.dtype) * weights[..., None, None]).sum(2)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description="dispatch and combine of the 340M layer, timed")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.tokens % args.seq_len:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")
    b, t, memories, k, h, v = args.tokens // args.seq_len, args.seq_len, 5, 3, 4, 256
    torch.manual_seed(0)
    dev = "cuda"
    routed = torch.rand(b, t, memories - 1, device=dev).argsort(-1)[..., :k - 1]
    memory_idx = torch.cat([routed, torch.full((b, t, 1), memories - 1, device=dev)], -1)
    mask = torch.ones(b, t, dtype=torch.bool, device=dev)
    _, _, row_of_choice, _ = ops.dispatch(memory_idx, mask, memories)
    o_rows = torch.randn(b * t * k, h, v, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(b, t, k, device=dev, requires_grad=True)
    d_y = torch.randn(b, t, h, v, device=dev)

    card, peaks = card_peaks(torch.cuda.get_device_name())
    rows, elems = b * t * k, b * t * k * h * v
    fwd_bytes = elems * 2 + rows * (4 + 8) + elems // k * 4
    bwd_bytes = elems // k * 4 + elems * 2 + rows * (4 + 8) + elems * 2 + rows * 4

    compiled = torch.compile(plain_combine, fullgraph=True)
    ways = {"mom::combine op": ops.combine, "plain torch, torch.compile": compiled}
    y_op, y_plain = (fn(o_rows, weights, row_of_choice) for fn in ways.values())
    agree = float((y_op - y_plain).abs().max())

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {tree_commit()}; "
          f"{args.tokens} tokens, T={t}, k={k}, H={h}, V={v}, o_rows bf16; combine outputs of the two ways "
          f"differ by {agree:.1e}")
    print("| step | way | forward ms | forward+backward ms |")
    print("| --- | --- | --- | --- |")
    for name, fn in (("mom::dispatch op", ops.dispatch), ("stock torch (its reference)", dispatch_reference)):
        call = functools.partial(fn, memory_idx, mask, memories)
        for how, run in (("", call), (", from a CUDA graph", graphed(call))):
            ms, _ = bench(run)
            print(f"| dispatch | {name}{how} | {ms:.3f} | (no gradient) |")
    for name, fn in ways.items():
        with torch.no_grad():
            fwd, _ = bench(lambda fn=fn: fn(o_rows, weights, row_of_choice))
        both, _ = bench(lambda fn=fn: torch.autograd.grad(fn(o_rows, weights, row_of_choice),
                                                          (o_rows, weights), d_y))
        print(f"| combine | {name} | {fwd:.3f} | {both:.3f} |", flush=True)
    fwd_floor, bwd_floor = fwd_bytes / card.bandwidth * 1e3, bwd_bytes / card.bandwidth * 1e3
    print(f"| combine | floor ({peaks}; {fwd_bytes / 1e6:.0f} + {bwd_bytes / 1e6:.0f} MB) "
          f"| {fwd_floor:.3f} | {fwd_floor + bwd_floor:.3f} |")


if __name__ == "__main__":
    main()
