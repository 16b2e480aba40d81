"""Registers, spill stores and shared memory of the chunk scan's and the segment conv's Triton
kernels, compiled for Hopper (sm_90) on any machine: no GPU needed.

The ops' CUDA launch code runs on small CPU tensors with Triton's launch intercepted; each launch
is compiled for sm_90 with the arguments' own specialisation (dtypes, 16-byte alignment, block
sizes, warps, stages) and assembled by the ptxas that Triton bundles, which reports registers and
spill stores. A kernel asking for more shared memory than one block may have on an H100/H200
(227 KB) fails there with OutOfResources; its row is marked "too much". Spill stores are local
memory traffic on the kernel's path: a lead for speed, not a measurement of it.

Uses Triton internals (`JITFunction.run`, `_pack_args`, `create_function_from_signature`), as of
Triton 3.6; another version may need this script adjusted.

    python benchmarks/kernel_resources.py [--dtype bf16] [--head-dim 256] [--expand-v 1] [--few-programs]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mom_compile

import torch  # noqa: E402

from mom_compile.ops.table import TRITON_FIX  # noqa: E402

try:
    import triton  # noqa: E402
except ImportError:
    sys.exit(f"kernel_resources.py compiles the Triton kernels: {TRITON_FIX} first")
from scan_inputs import scan_inputs  # noqa: E402
from tree_commit import tree_commit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def launches(dtype: torch.dtype, head_dim: int, expand_v: int, few_programs: bool) -> list[tuple]:
    """(kernel, args, kwargs) of every launch of the scan's and the conv's forward and backward;
    few_programs: as on a GPU with more SMs than the state passes have programs."""
    from mom_compile.ops import chunk_gated_delta_triton, segment_conv_triton

    recorded = []

    def record(fn, *args, grid, warmup, **kwargs):
        recorded.append((fn, args, kwargs))

    run, jit.JITFunction.run = jit.JITFunction.run, record
    sm_count = chunk_gated_delta_triton._sm_count
    if few_programs:
        chunk_gated_delta_triton._sm_count = lambda device: 1 << 20
    try:
        h, dv, width = 4, head_dim * expand_v, 4
        offsets = torch.tensor([0, 100, 300])
        n = int(offsets[-1])
        q, k, v, g, beta = scan_inputs(offsets, dtype, h, head_dim, dv)
        init = torch.zeros(2, h, head_dim, dv, dtype=g.dtype) if dtype == torch.float64 else None
        scan = (q, k, v, g, beta, offsets, init, head_dim ** -0.5)
        chunk_gated_delta_triton.chunk_gated_delta_triton(*scan)
        chunk_gated_delta_triton.chunk_gated_delta_backward_triton(*scan, torch.randn_like(v), init)
        d = h * (2 * head_dim + dv)
        x, history = torch.randn(n, d, dtype=dtype), torch.zeros(2, width - 1, d, dtype=dtype)
        conv = (x, torch.randn(d, width, dtype=dtype), torch.randn(d, dtype=dtype), offsets, history)
        segment_conv_triton.segment_conv_triton(*conv)
        segment_conv_triton.segment_conv_backward_triton(torch.randn_like(x), history, *conv)
    finally:
        jit.JITFunction.run = run
        chunk_gated_delta_triton._sm_count = sm_count
    return recorded


def resources(fn, args, kwargs, backend, ptxas: str) -> dict:
    """Compile one launch for sm_90; its registers, spill stores, shared memory and warps."""
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(source, target=TARGET, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch=sm_{TARGET.arch}a", "-v", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True)
    text = report.stdout + report.stderr
    regs, spills = re.search(r"Used (\d+) registers", text), re.search(r"(\d+) bytes spill stores", text)
    if regs is None:
        raise RuntimeError(f"ptxas gave no register count for {fn.__name__}:\n{text[-2000:]}")
    return dict(regs=int(regs.group(1)), spills=int(spills.group(1)) if spills else 0,
                shared=kernel.metadata.shared, warps=kernel.metadata.num_warps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="the Triton kernels' registers, spills and shared memory on sm_90")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--head-dim", type=int, choices=[64, 128, 256], default=256)
    parser.add_argument("--expand-v", type=int, choices=[1, 2], default=1)
    parser.add_argument("--few-programs", action="store_true",
                        help="the scan's configuration where its state passes leave SMs idle")
    args = parser.parse_args()
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        parser.error(f"Triton's bundled ptxas is not at {ptxas}")
    backend = make_backend(TARGET)
    print(f"# sm_90, triton {triton.__version__}, commit {tree_commit()}; {args.dtype}, head_dim "
          f"{args.head_dim}, expand_v {args.expand_v} (scan H=4; conv channels 4 * (2K + V), width 4)"
          + (", the scan's few-programs configuration" if args.few_programs else ""))
    print("| kernel | warps | registers | spill stores (B) | shared memory (B) |")
    print("| --- | --- | --- | --- | --- |")
    seen = set()
    recorded = launches(DTYPES[args.dtype], args.head_dim, args.expand_v, args.few_programs)
    for fn, call_args, kwargs in recorded:
        if fn.__name__ in seen:  # the backward launches the forward's first kernels again
            continue
        seen.add(fn.__name__)
        r = resources(fn, call_args, kwargs, backend, ptxas)
        over = " (too much for sm_90)" if r["shared"] > SHARED_LIMIT else ""
        print(f"| {fn.__name__} | {r['warps']} | {r['regs']} | {r['spills']} | {r['shared']}{over} |",
              flush=True)


if __name__ == "__main__":
    main()
