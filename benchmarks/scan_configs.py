"""Tile and warp configurations of the chunk scan's Triton kernels at the 340M layer's shapes.

Shapes: 16 sequences of T=2048, 4 routed memory segments of uneven length (2T rows in all) and
the shared one (T rows) each: 98,304 rows, H=4, K=V=256, bf16 inputs, fp32 decays. Each
configuration (a JSON object of `chunk_scan_triton.default_config` keys to override) runs in its
own process, since a miscompiled one can leave an illegal memory access behind, and is compared
with the default configuration of the same process (max |diff| / max |default| over the outputs
and gradients: a different warp count reorders sums, so ~1e-3 in bf16 is expected; a wrong
kernel shows as far more). Forward and backward (which recomputes the forward's states) in median
ms over CUDA events.

    python benchmarks/scan_configs.py ['{"state_bv": 16, "state_warps": 4}' ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from gpu_timing import bench
from scan_inputs import scan_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mom_compile

DEFAULT_SWEEP = [{}, {"state_stages": 1}, {"state_stages": 3}, {"state_bv": 16, "state_warps": 4}]


def inputs():
    """16 sequences of T=2048, each 4 routed segments of uneven length (2T rows) and the shared one."""
    torch.manual_seed(0)
    b, t, m = 16, 2048, 4
    lens = []
    for _ in range(b):
        share = torch.rand(m) + 0.2
        seg = (share / share.sum() * 2 * t).long()
        seg[-1] = 2 * t - seg[:-1].sum()
        lens += seg.tolist() + [t]
    offsets = torch.tensor([0] + lens).cumsum(0).cuda()
    return (*scan_inputs(offsets), offsets)


def measure(config: dict) -> dict:
    from mom_compile.ops import chunk_scan_triton as cst
    args = (*inputs(), None, 256 ** -0.5)
    d_o = torch.randn_like(args[2])

    def fwd(cfg):
        return cst.chunk_gated_delta_triton(*args, config=cfg)

    def bwd(cfg):
        return cst.chunk_gated_delta_backward_triton(*args, d_o, None, config=cfg)[:5]

    ref = [*fwd(None), *bwd(None)]
    out = [*fwd(config), *bwd(config)]
    diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
               for a, b in zip(out, ref))
    return dict(diff=diff, fwd=bench(lambda: fwd(config), iters=8)[0],
                bwd=bench(lambda: bwd(config), iters=8)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description="the chunk scan's kernel configurations, timed")
    parser.add_argument("configs", nargs="*", type=json.loads, metavar="JSON",
                        help="overrides of default_config, e.g. '{\"solve_warps\": 8}' (default: a sweep)")
    parser.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; 98,304 rows, H=4, K=V=256, bf16")
    print("| config | max diff vs default | forward ms | backward ms |")
    print("| --- | --- | --- | --- |")
    for config in args.configs or DEFAULT_SWEEP:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)],
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            print(f"| {config or 'default'} | timed out | | |", flush=True)
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
            print(f"| {config or 'default'} | failed: {error} | | |", flush=True)
            continue
        r = json.loads(lines[-1])
        print(f"| {config or 'default'} | {r['diff']:.1e} | {r['fwd']:.2f} | {r['bwd']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
