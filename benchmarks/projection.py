"""The input projections of one MoM layer: every memory on every token (what `MomLayer` does, one
stacked GEMM) against only the memories each token is routed to (a grouped GEMM over the
dispatched rows). Issue 3 asks for both to be measured.

Shapes: the paper's 340M layer (d=1024, H=4, head_dim 256, expand_v 1, M=4 top-2 + shared memory),
bf16, N tokens (default 32K), random routing. A token's own projections (router | q | output gate)
are 2052 columns; each memory set's (k | v | beta | alpha) 2056 columns, 5 sets:
  - stacked, unpadded: one GEMM x @ [12332, d]^T, every set on every token;
  - stacked, padded (as built): the same weight padded with zero rows to 12336, a multiple of 8,
    so that the output's rows are 16-byte aligned;
  - grouped: the token's own projections as one GEMM (padded to 2056 rows), then every set on
    its routed rows only: x gathered into memory-major row order and `torch._grouped_mm` with one
    [d, 2056] weight per set (offsets on the device, no host sync): 40% fewer FLOPs in the
    per-memory part, 33% in all. The sort of rows by memory is timed with it; a second row times
    it with the rows' order and group offsets given (what a memory-major dispatch would hand over:
    `mom::dispatch` orders rows by (sequence, memory), memory-major only for one sequence).
Forward = the projection(s); forward+backward adds the gradients of x and of the weights (and,
for grouped, the gather's scatter-add back onto tokens). Median ms over CUDA events.

    python benchmarks/projection.py [--tokens 32768]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from gpu_timing import bench
from tree_commit import tree_commit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    n, d, memories, topk = args.tokens, 1024, 4, 2
    per_token, per_set, sets = 4 + 1024 + 1024, 1024 + 1024 + 4 + 4, memories + 1
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    w_tok = (torch.randn(per_token, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    w_sets = (torch.randn(sets, per_set, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    w_stacked = torch.cat([w_tok, w_sets.flatten(0, 1)]).detach().requires_grad_()
    w_padded = F.pad(w_stacked.detach(), (0, 0, 0, -w_stacked.shape[0] % 8)).requires_grad_()
    w_tok_padded = F.pad(w_tok.detach(), (0, 0, 0, -per_token % 8)).requires_grad_()
    # each token: topk distinct routed memories and the shared one (index `memories`)
    routed = torch.rand(n, memories, device=dev).argsort(-1)[:, :topk]
    memory = torch.cat([routed, torch.full((n, 1), memories, device=dev)], 1).flatten()
    token = torch.arange(n, device=dev).repeat_interleave(topk + 1)

    def memory_major():
        """Each row's token and the groups' end offsets, the rows sorted by memory (stably)."""
        # counted without torch.bincount, whose CUDA kernel reads the input's range on the host
        counts = memory.new_zeros(sets).index_add_(0, memory, torch.ones_like(memory))
        offs = counts.cumsum(0).to(torch.int32)
        return token[memory.argsort(stable=True)], offs

    def grouped(token_of_row, offs):
        rows = torch._grouped_mm(x[token_of_row], w_sets.transpose(1, 2), offs=offs)
        return F.linear(x, w_tok_padded), rows

    given = memory_major()

    variants = {"stacked, 12332 rows (unpadded)": lambda: (F.linear(x, w_stacked),),
                f"stacked, padded to {w_padded.shape[0]} rows (as built)": lambda: (F.linear(x, w_padded),),
                "grouped over routed rows": lambda: grouped(*memory_major()),
                "grouped over routed rows, order given": lambda: grouped(*given)}
    # the grouped result must equal the matching rows of the dense one
    with torch.no_grad():
        dense = F.linear(x, w_stacked)[:, per_token:]
        _, g = grouped(*given)
        order = memory.argsort(stable=True)
        want = dense.reshape(n, sets, per_set)[token[order], memory[order]]
        err = ((g.float() - want.float()).abs().max() / want.float().abs().max()).item()
    flops_all = 2 * n * d * (per_token + sets * per_set)
    flops_grouped = 2 * n * d * (per_token + (topk + 1) * per_set)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {tree_commit()}, "
          f"N={n} tokens, bf16; grouped vs dense rows: max rel diff {err:.1e}")
    print("| projection | forward ms | forward+backward ms | forward TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for name, fn in variants.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn()

        def fwd_bwd(fn=fn):
            outs = fn()
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        f, fb = bench(fwd, warmup=3, iters=20)[0], bench(fwd_bwd, warmup=3, iters=20)[0]
        flops = flops_grouped if name.startswith("grouped") else flops_all
        print(f"| {name} | {f:.3f} | {fb:.3f} | {flops / f / 1e9:.0f} |")


if __name__ == "__main__":
    main()
