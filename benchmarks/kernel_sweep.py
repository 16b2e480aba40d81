"""Each Triton kernel of the chunk scan and the segment conv alone, relaunched with other launch
parameters (warps, pipeline stages, loop tiles) on the arguments the op gave it.

`kernel_configs.py` times whole ops under one shared configuration; a parameter that helps one
kernel and hurts another cancels out there. Here the scan's forward and backward and the conv's
forward and backward (kernel_configs.py's inputs: 340M layer, bf16, --layout B T) run once with
every kernel's launch recorded; each listed kernel is then relaunched on a copy of the arguments it
got (restored before every launch, so in-place kernels start alike), first as recorded, then with
each variant. A row: the variant, the max |diff| over the kernel's outputs relative to the recorded
launch's (a reordered sum gives ~1e-7 in fp32 accumulators; a wrong kernel far more), and the
median ms of CUDA events around single launches.

    python benchmarks/kernel_sweep.py [KERNEL ...] [--layout 16 2048]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import triton  # noqa: E402
from kernel_configs import conv_calls, scan_calls  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

from mom_compile.ops import chunk_gated_delta_triton_bwd as bwd  # noqa: E402
from mom_compile.ops import chunk_gated_delta_triton_fwd as fwd  # noqa: E402
from mom_compile.ops import segment_conv_triton as conv  # noqa: E402

W, S = "num_warps", "num_stages"
# kernel: (module, variants); a variant overrides the recorded launch's keywords
SWEEP = {
    "wy_solve_kernel": (fwd, [{W: 2}, {W: 4}, {S: 2}, {"BK": 128}]),
    "wy_apply_kernel": (fwd, [{S: 2}, {W: 8}, {"BV": 128}, {"BK": 128, "BV": 128}]),
    "state_fwd_kernel": (fwd, [{S: 1}, {W: 4}]),
    "output_kernel": (fwd, [{S: 2}, {W: 8}, {"BV": 128}, {"BV": 256, W: 8}, {"BK": 32}]),
    "dvn_local_kernel": (bwd, [{S: 2}, {W: 8}, {"BV": 128}, {"BK": 128}]),
    "state_bwd_kernel": (bwd, [{S: 1}, {W: 4}]),
    "grad_qkw_kernel": (bwd, [{"BK": 64, W: 4}, {"BK": 64, W: 4, S: 2}, {"BK": 64, W: 4, "BV": 32}, {S: 2},
                              {S: 4}, {"BV": 32}, {"BK": 256}, {"BK": 128, W: 4}]),
    "wy_bwd_kernel": (bwd, [{S: 2}, {S: 4}, {W: 8}, {"BV": 32}, {"BV": 128}]),
    "_conv_kernel": (conv, [{W: 2}, {W: 8}]),
    "_dz_kernel": (conv, [{W: 2}, {W: 8}]),
    "_dx_kernel": (conv, [{S: 1}, {S: 2}, {W: 2}]),
}
# kernels whose grid axis 0 is (items) x (blocks of a dimension): the block keyword and the dimension
GRID_BLOCK = {"output_kernel": ("BV", "V"), "state_fwd_kernel": ("BV", "V"), "state_bwd_kernel": ("BV", "V"),
              "grad_qkw_kernel": ("BK", "K")}
PARTIAL_SUMS = {"grad_qkw_kernel": "dg_part"}  # one slice per K-block: compared summed over blocks


class Recorder:
    """Stands in for a kernel: launches it and keeps its last launch (arguments copied first)."""

    def __init__(self, jit):
        self.jit, self.launch = jit, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.launch = tuple(grid), list(args), copies, dict(kwargs)
            return self.jit[grid](*args, **kwargs)
        return run


def record(layout: tuple[int, int]) -> dict[str, Recorder]:
    recorders = {name: Recorder(getattr(module, name)) for name, (module, _) in SWEEP.items()}
    for name, (module, _) in SWEEP.items():
        setattr(module, name, recorders[name])
    try:
        for calls in (scan_calls(layout), conv_calls(layout)):
            calls["forward"](None)
            calls["backward"](None)
        torch.cuda.synchronize()
    finally:
        for name, (module, _) in SWEEP.items():
            setattr(module, name, recorders[name].jit)
    return recorders


def relaunch(name: str, rec: Recorder, variant: dict) -> tuple[float, list[torch.Tensor]]:
    """(ms of one launch with variant applied, the kernel's tensors after it)."""
    grid, args, copies, kwargs = rec.launch
    kwargs = {W: 4, S: 3, **kwargs}  # Triton's defaults, explicit so that a variant shows its change
    grid, args = list(grid), list(args)
    if name in GRID_BLOCK and GRID_BLOCK[name][0] in variant:
        block, dim = GRID_BLOCK[name]
        blocks, new_blocks = triton.cdiv(kwargs[dim], kwargs[block]), triton.cdiv(kwargs[dim], variant[block])
        grid[0] = grid[0] // blocks * new_blocks
        if name in PARTIAL_SUMS:
            i = rec.jit.arg_names.index(PARTIAL_SUMS[name])
            args[i] = args[i].new_zeros(new_blocks, *args[i].shape[1:])
    for a, c in zip(args, copies):
        if isinstance(a, torch.Tensor) and a.shape == c.shape:
            a.copy_(c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    rec.jit[tuple(grid)](*args, **{**kwargs, **variant})
    end.record()
    end.synchronize()
    tensors = [a.float().sum(0) if n == PARTIAL_SUMS.get(name) else a
               for a, n in zip(args, rec.jit.arg_names) if isinstance(a, torch.Tensor)]
    return start.elapsed_time(end), tensors


def max_rel_diff(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(out, ref):
        a, b = a.float(), b.float()
        d = torch.where(torch.isnan(a) & torch.isnan(b), 0.0, (a - b).abs()).max()  # torch's max keeps a NaN
        rel = (d / b.nan_to_num().abs().max().clamp_min(1e-30)).item()
        worst = max(worst, rel if rel == rel else float("inf"))  # Python's max would drop a NaN
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels", nargs="*", metavar="KERNEL", help=f"default: all of {', '.join(SWEEP)}")
    parser.add_argument("--layout", type=int, nargs=2, default=[16, 2048], metavar=("B", "T"))
    parser.add_argument("--launches", type=int, default=10)
    args = parser.parse_args()
    if unknown := sorted(set(args.kernels) - set(SWEEP)):
        parser.error(f"KERNEL: expected some of {', '.join(SWEEP)}, got {', '.join(unknown)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    recorders = record(tuple(args.layout))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, commit "
          f"{tree_commit()}; layout {args.layout[0]} x {args.layout[1]}, bf16; median of {args.launches} "
          "launches")
    print("| kernel | launch | max diff vs recorded | ms |\n| --- | --- | --- | --- |")
    for name in args.kernels or SWEEP:
        rec = recorders[name]
        _, ref = relaunch(name, rec, {})
        ref = [t.clone() for t in ref]
        for variant in [{}] + SWEEP[name][1]:
            try:
                _, out = relaunch(name, rec, variant)  # compiles
                diff = f"{max_rel_diff(out, ref):.1e}"
                ms = f"{statistics.median(relaunch(name, rec, variant)[0] for _ in range(args.launches)):.3f}"
            except Exception as exc:  # noqa: BLE001 (a variant that does not compile or fit is a result)
                diff, ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}", ""
            print(f"| {name} | {variant or 'as recorded'} | {diff} | {ms} |", flush=True)


if __name__ == "__main__":
    main()
