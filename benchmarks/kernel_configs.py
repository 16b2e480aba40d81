"""Tile and warp configurations of the chunk scan's, the segment conv's and the decode op's Triton
kernels, at the 340M layer's shapes.

Rows: 16 sequences of T=2048 (--layout B T: B sequences of T), each split into 4 routed memory
segments of uneven length (2T rows in all) and the shared one (T rows): 98,304 rows, bf16.
  scan: H=4, K=V=256, fp32 decays; forward and backward (which recomputes the forward's states);
  conv: 3,072 channels (q|k|v), width 4, with a history per segment; forward and backward.
decode: ten `mom::memory_decode_` steps of the 340M layer's heads at batch 64 (3 of 5 memories a
  token, tests/inputs.py's decode_inputs), fp32 states, in place, replayed from a CUDA graph.
Each configuration (a JSON object of the op's `default_config` keys to override), after the
default one, runs in its own process, since a miscompiled one can leave an illegal memory access
behind, and is compared with the default configuration of the same process (max |diff| / max
|default| over the outputs and gradients: a different warp count reorders sums, so ~1e-3 in bf16
is expected; a wrong kernel shows as far more). Median ms over CUDA events, each call queued behind
a sleep kernel: the GPU's time, not the host's time to launch (which paces small layouts).

    python benchmarks/kernel_configs.py scan ['{"state_bv": 16, "state_warps": 4}' ...]
    python benchmarks/kernel_configs.py scan --layout 1 512     # a batch-1 prefill's rows
    python benchmarks/kernel_configs.py conv ['{"dx_row_blocks": 16}' ...]
    python benchmarks/kernel_configs.py decode ['{"block_v": 16, "step_warps": 4}' ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the checkout's mom_compile, the tests' inputs

import torch  # noqa: E402
from gpu_timing import bench  # noqa: E402
from scan_inputs import scan_inputs  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

SWEEPS = {
    # the last: the wide slices, the default where the state passes' programs fill the SMs
    "scan": [{}, {"state_stages": 1}, {"state_bv": 16, "state_warps": 4},
             {"state_bv": 64, "state_warps": 8, "state_bwd_warps": 8}],
    # tile widths forward and backward, _dz_kernel's row blocks, _dx_kernel's rows per program
    "conv": [{}, {"block_d": 64}, {"block_d_backward": 64}, {"block_n_backward": 64}, {"dx_row_blocks": 16},
             {"dx_warps": 8, "dx_block_n": 32}],
    "decode": [{}, {"step_warps": 4}, {"step_warps": 2}, {"block_v": 16}, {"block_v": 32, "step_warps": 4},
               {"block_v": 8, "step_warps": 2}],
}


def layer_offsets(b: int = 16, t: int = 2048, memories: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    lens = []
    for _ in range(b):
        share = torch.rand(memories) + 0.2
        seg = (share / share.sum() * 2 * t).long()
        seg[-1] = 2 * t - seg[:-1].sum()
        lens += seg.tolist() + [t]
    return torch.tensor([0] + lens).cumsum(0).cuda()


def scan_calls(layout: tuple[int, int]):
    from mom_compile.ops import chunk_gated_delta_triton as cst
    offsets = layer_offsets(*layout)
    q, k, v, g, beta = scan_inputs(offsets)
    args = (q, k, v, g, beta, offsets, None, 256 ** -0.5)
    d_o = torch.randn_like(v)
    return dict(forward=lambda cfg: cst.chunk_gated_delta_triton(*args, config=cfg),
                backward=lambda cfg: cst.chunk_gated_delta_backward_triton(*args, d_o, None, config=cfg)[:5])


def conv_calls(layout: tuple[int, int]):
    from mom_compile.ops import segment_conv_triton as sct
    offsets = layer_offsets(*layout)
    n, d, width, n_seg = int(offsets[-1]), 3072, 4, offsets.numel() - 1
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(d, width, device="cuda", dtype=torch.bfloat16) * 0.5
    bias = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    history = torch.randn(n_seg, width - 1, d, device="cuda", dtype=torch.bfloat16)
    d_y, d_final = torch.randn_like(x), torch.randn_like(history)
    args = (x, weight, bias, offsets, history)
    return dict(forward=lambda cfg: sct.segment_conv_triton(*args, config=cfg),
                backward=lambda cfg: sct.segment_conv_backward_triton(d_y, d_final, *args, config=cfg))


def decode_calls(layout: tuple[int, int], batch: int = 64):
    """Steps at `batch` rows: a row layout is the scan's and the conv's, not a decode step's."""
    from mom_compile.ops import memory_decode_triton as mdt

    from inputs import decode_inputs
    dk = 256
    *args, conv, rec = decode_inputs(batch, h=4, dk=dk, dv=dk, width=4, slots=5, chosen=3, with_bias=False,
                                     dtype=torch.bfloat16, device="cuda")

    graphs = {}

    def ten_steps(cfg):  # on the same tables, replayed from a CUDA graph: GPU time, not launches
        key = json.dumps(cfg, sort_keys=True)
        if key not in graphs:
            mdt.memory_decode_triton_(*args, conv, rec, dk ** -0.5, False, config=cfg)  # compiles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    o = mdt.memory_decode_triton_(*args, conv, rec, dk ** -0.5, False, config=cfg)
            graphs[key] = graph, o
        graphs[key][0].replay()
        return (graphs[key][1],)

    def check(cfg):  # one step from copies of the tables: every configuration steps the same states
        conv_t, rec_t = conv.clone(), rec.clone()
        return mdt.memory_decode_triton_(*args, conv_t, rec_t, dk ** -0.5, False, config=cfg), conv_t, rec_t

    return dict(ten_steps=ten_steps, check=check)


CALLS = {"scan": scan_calls, "conv": conv_calls, "decode": decode_calls}
TIMED = {"scan": ("forward", "backward"), "conv": ("forward", "backward"), "decode": ("ten_steps",)}


def measure(op: str, config: dict, layout: tuple[int, int]) -> dict:
    """Max diff vs the default over every output (of `check` where an op has one: decode steps
    copies), and median ms of each timed call."""
    calls = CALLS[op](layout)
    check = calls.get("check") or (lambda cfg: [out for name in TIMED[op] for out in calls[name](cfg)])
    ref, out = check(None), check(config)
    diff = torch.stack([(a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)
                        for a, b in zip(out, ref)]).max().item()  # torch's max keeps a NaN
    times = {name: bench(lambda f=calls[name]: f(config), iters=8, queued=True)[0] for name in TIMED[op]}
    return dict(diff=diff, **times)


def main() -> None:
    parser = argparse.ArgumentParser(description="the Triton kernels' configurations, timed")
    parser.add_argument("op", choices=sorted(CALLS))
    parser.add_argument("configs", nargs="*", type=json.loads, metavar="JSON",
                        help="overrides of the op's default_config, e.g. '{\"dz_warps\": 2}' "
                             "(default: a sweep)")
    parser.add_argument("--layout", type=int, nargs=2, default=[16, 2048], metavar=("B", "T"),
                        help="scan and conv: the rows of B sequences of T tokens (default 16 2048)")
    parser.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()  # configs before or after --layout
    if args.child is not None:
        print(json.dumps(measure(args.op, args.child, tuple(args.layout))))
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    timed = TIMED[args.op]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {tree_commit()}; {args.op}, "
          f"layout {args.layout[0]} x {args.layout[1]}, shapes: see docstring")
    print("| config | max diff vs default | " + " | ".join(f"{name.replace('_', ' ')} ms" for name in timed)
          + " |")
    print("| --- | --- |" + " --- |" * len(timed))
    # the default first, whatever is asked: every row has its same-run baseline
    configs = [{}] + [c for c in args.configs if c] if args.configs else SWEEPS[args.op]
    for config in configs:
        try:
            proc = subprocess.run([sys.executable, __file__, args.op, "--child", json.dumps(config),
                                   "--layout", *map(str, args.layout)],
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
        times = " | ".join(f"{r[name]:.3f}" for name in timed)
        print(f"| {config or 'default'} | {r['diff']:.1e} | {times} |", flush=True)


if __name__ == "__main__":
    main()
