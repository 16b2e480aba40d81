"""GPU check and benchmark of the Triton kernels, in one process (device time is scarce).

1. Every case of tests/test_triton_kernels.py on the GPU vs the float64 CPU reference: a table of
   the worst relative error per op, dtype and output (forward and each gradient).
2. Timings, bf16, the paper's 340M layer (d=1024, H=4, head_dim=256, expand_v=1, M=4, top-2, shared
   memory) at 32K tokens per batch for each T: forward and forward+backward of `MomLayer` with the
   Triton kernels, with the pure-PyTorch reference kernels (the same ops with their CUDA kernels
   disabled), and a softmax-attention layer of the same width through SDPA; plus the chunk scan op
   alone at the layer's shapes.

    python benchmarks/check_gpu.py [--no-checks] [--ts 2048 8192] [--tokens 32768] [--no-reference]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mom_compile import MomConfig, MomLayer  # noqa: E402

OPS = ["chunk_scan.chunk_gated_delta", "chunk_scan.chunk_gated_delta_backward",
       "segment_conv.segment_conv", "segment_conv.segment_conv_backward", "state_step.gated_delta_step"]


def custom_op_defs():
    """The CustomOpDef of each op that has a Triton kernel (module `_name` attributes)."""
    for path in OPS:
        module, name = path.split(".")
        yield getattr(sys.modules[f"mom_compile.ops.{module}"], f"_{name}")


@contextlib.contextmanager
def reference_kernels():
    """Run the ops' pure-PyTorch reference on CUDA by disabling their CUDA (Triton) kernels."""
    with contextlib.ExitStack() as stack:
        for op in custom_op_defs():
            stack.enter_context(op.set_kernel_enabled("cuda", False))
        yield


def run_checks() -> None:
    from test_triton_kernels import CASES, TOLERANCE, case_id, run_case
    worst: dict[tuple, dict[str, float]] = defaultdict(dict)
    failures = []
    for case in CASES:
        try:
            errors = run_case(case, "cuda")
        except Exception as exc:  # keep going: the table shows every case
            failures.append(f"{case_id(case)}: {type(exc).__name__}: {exc}")
            continue
        key = (case[0], str(case[1]).replace("torch.", ""))
        for name, err in errors.items():
            worst[key][name] = max(worst[key].get(name, 0.0), err)
            if not err <= TOLERANCE[case[1]]:
                failures.append(f"{case_id(case)} {name}: {err:.2e} > {TOLERANCE[case[1]]:.0e}")
    print(f"\n## Kernel vs float64 reference on {torch.cuda.get_device_name()}: worst relative error")
    print("| op | dtype | " + " | ".join(["output", "error"] * 1) + " |")
    print("| --- | --- | --- | --- |")
    for (op, dtype), errs in sorted(worst.items()):
        for name, err in errs.items():
            print(f"| {op} | {dtype} | {name} | {err:.2e} |")
    print(f"{len(CASES)} cases, {len(failures)} failures")
    for line in failures:
        print("  FAIL", line)


def bench(fn, warmup: int = 2, iters: int = 10, budget_s: float = 20.0) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up; fewer iterations when slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times)


class SoftmaxAttention(nn.Module):
    """A causal softmax-attention layer of the MoM layer's width: q/k/v/o projections + SDPA."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def _forward(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def _forward_backward(module: nn.Module, x: torch.Tensor, d_y: torch.Tensor) -> None:
    out = module(x.detach().requires_grad_())
    (out[0] if isinstance(out, tuple) else out).backward(d_y)


def layer_timings(ts: list[int], tokens: int, with_reference: bool) -> list[tuple]:
    cfg = MomConfig(hidden_size=1024, num_heads=4, head_dim=256, expand_v=1.0, num_memories=4, topk=2,
                    shared_mem=True, num_hidden_layers=1)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layer = MomLayer(cfg).to(dev, dt)
    attn = SoftmaxAttention(1024, 4, 256).to(dev, dt)
    rows = []
    for t in ts:
        b = max(1, tokens // t)
        x = torch.randn(b, t, 1024, device=dev, dtype=dt)
        d_y = torch.randn_like(x)
        variants = [("MomLayer, Triton kernels", layer, contextlib.nullcontext)]
        if with_reference:
            variants.append(("MomLayer, PyTorch reference kernels", layer, reference_kernels))
        variants.append(("softmax attention (SDPA)", attn, contextlib.nullcontext))
        for name, module, ctx in variants:
            slow = ctx is reference_kernels
            with ctx():
                f_ms = bench(functools.partial(_forward, module, x), warmup=1, iters=3 if slow else 10)
                fb_ms = bench(functools.partial(_forward_backward, module, x, d_y), warmup=1,
                              iters=2 if slow else 10)
            rows.append((t, b, name, f_ms, fb_ms))
            print(f"  T={t} B={b} {name}: fwd {f_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms", flush=True)
            module.zero_grad(set_to_none=True)
        del x, d_y
        torch.cuda.empty_cache()
    return rows


def scan_op_timings(ts: list[int], tokens: int) -> list[tuple]:
    """The chunk scan op alone at the layer's routed shapes: B*T*(k+1) rows in B*(M+1) segments
    (top-2 of 4 memories plus the shared one), H=4, K=V=256, bf16: the registered chunked kernels
    (their default tiles, the configuration the checks verify), and the per-kernel split of the
    registered forward+backward (torch profiler) at the first T."""
    rows = []
    h, dk, dv = 4, 256, 256
    for t in ts:
        b = max(1, tokens // t)
        counts = torch.full((b, 5), 0, dtype=torch.int64)
        counts[:, :4] = (2 * t) // 4  # routed rows spread evenly over the memories
        counts[:, 4] = t
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.flatten().cumsum(0)]).cuda()
        n = int(offsets[-1])
        q = F.normalize(torch.randn(n, h, dk, device="cuda"), dim=-1).bfloat16()
        k = F.normalize(torch.randn(n, h, dk, device="cuda"), dim=-1).bfloat16()
        v = torch.randn(n, h, dv, device="cuda", dtype=torch.bfloat16)
        g = -torch.rand(n, h, device="cuda") * 0.1
        beta = torch.rand(n, h, device="cuda", dtype=torch.bfloat16)
        d_o = torch.randn_like(v)
        args = (q, k, v, g, beta, offsets, None, dk ** -0.5)
        variants = [("fwd chunked (registered)", functools.partial(torch.ops.mom.chunk_gated_delta, *args)),
                    ("bwd chunked (registered)",
                     functools.partial(torch.ops.mom.chunk_gated_delta_backward, *args, d_o, None))]
        for name, fn in variants:
            try:
                ms = bench(fn, iters=10)
            except Exception as exc:  # a config that does not compile: report, keep going
                print(f"  scan op T={t} {name}: failed {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append((t, b, n, name, ms))
            print(f"  scan op T={t} rows {n}: {name}: {ms:.2f} ms", flush=True)
        if t == ts[0]:
            kernel_split(variants[0][1], variants[1][1])
    return rows


def kernel_split(fwd, bwd) -> None:
    """GPU time per kernel of one forward and one backward (torch profiler), to see which stage
    bounds the scan."""
    from torch.profiler import ProfilerActivity, profile
    fwd(), bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd(), bwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def sync_free_check() -> None:
    """The registered scan, forward and backward, under torch.cuda.set_sync_debug_mode("error")."""
    from test_triton_kernels import scan_inputs
    a = scan_inputs("mixed", 2, 64, 64, torch.bfloat16, "cuda", seed=5)
    d_o = torch.randn_like(a["v"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.mom.chunk_gated_delta(**a, scale=0.125)
        torch.ops.mom.chunk_gated_delta_backward(**a, scale=0.125, d_o=d_o, d_final=None)
        print("sync-free: chunk scan fwd+bwd ran under set_sync_debug_mode('error')")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--ts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    import triton
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
          f"commit {commit}{' + uncommitted changes' if dirty else ''}")
    if not args.no_checks:
        t0 = time.perf_counter()
        run_checks()
        sync_free_check()
        print(f"(checks took {time.perf_counter() - t0:.0f} s)")
    if args.no_bench:
        return
    print("\n## timings (bf16, median ms)")
    scan_rows = scan_op_timings(args.ts, args.tokens)
    layer_rows = layer_timings(args.ts, args.tokens, not args.no_reference)
    print("\n| T | B | layer | forward ms | forward+backward ms |")
    print("| --- | --- | --- | --- | --- |")
    for t, b, name, f_ms, fb_ms in layer_rows:
        print(f"| {t} | {b} | {name} | {f_ms:.2f} | {fb_ms:.2f} |")
    print("\n| T | B | scan rows | chunk scan kernel | ms |")
    print("| --- | --- | --- | --- | --- |")
    for t, b, n, name, ms in scan_rows:
        print(f"| {t} | {b} | {n} | {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
