"""Host microseconds of the eager decode step's Python around its kernels, on any machine (no GPU):
each op wrapper's argument checks, and each Triton launcher with its kernels replaced by no-ops
(so the launch itself, which needs a GPU, is left out). 340m config, bf16, batch 1, CPU tensors.
The route and the gated norm are also called whole, through their checked wrappers and as the
layer's eager step calls them (`direct_call.call`, no checks), with the launchers standing in for
their CPU kernels.

`host_overhead.py` measures the real step on a GPU; this isolates the part of it that changes
with our Python, so that a change to it gets a same-machine before/after where no GPU is at hand:
run it on both trees. Fastest of --rounds repeats of --calls calls a row.

    python benchmarks/launch_overhead.py [--calls 20000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import importlib
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mom_compile

import torch  # noqa: E402
from host import cpu_model  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig, MomLayer, ops  # noqa: E402
from mom_compile.graphs.cache import MomCache  # noqa: E402
from mom_compile.ops.direct_call import call  # noqa: E402

TRITON_MODULES = ("memory_decode_triton", "route_triton", "gated_rms_norm_triton")


class NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    launchers = {}
    for name in TRITON_MODULES:
        module = importlib.import_module(f"mom_compile.ops.{name}")
        for attr in dir(module):
            if attr.endswith("_kernel"):
                setattr(module, attr, NoLaunch())
        launchers[name] = module
    # ops/launch.py keys its cache by the current CUDA device: device 0, as on a one-GPU host (a
    # no-op launch returns no compiled kernel, so every call takes its key and misses)
    torch.cuda.current_device = lambda: 0
    decode_op = importlib.import_module("mom_compile.ops.memory_decode")
    route_op = importlib.import_module("mom_compile.ops.route").route_op
    norm_op = importlib.import_module("mom_compile.ops.gated_rms_norm").gated_rms_norm_op

    torch.manual_seed(0)
    config = MomConfig.preset("340m")
    layer = MomLayer(config).to(torch.bfloat16)
    state = MomCache(config, 1, torch.bfloat16)[0]
    x = torch.randn(1, 1, config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        logits, q, z, per_set = layer.project(x)
        memory_idx, weights = layer.route(logits)
    decode = (q[:, 0], per_set[:, 0], memory_idx[:, 0], layer.A_log, layer.dt_bias,
              layer.conv_weight.squeeze(1), layer.conv_bias, state.conv, state.recurrent, layer.scale,
              config.single_kv_proj)
    y = torch.randn(1, 1, memory_idx.shape[-1], config.num_heads, config.head_v_dim)
    norm = (y, z, layer.o_norm.weight, layer.o_norm.eps, torch.bfloat16, weights)
    # from here on the CPU "kernels" of the route and the norm are their launchers, launching nothing
    route_op._backend_fns["cpu"] = launchers["route_triton"].route_triton
    norm_op._backend_fns["cpu"] = launchers["gated_rms_norm_triton"].gated_rms_norm_triton
    decode_launcher = launchers["memory_decode_triton"].memory_decode_triton_
    route_launcher = launchers["route_triton"].route_triton
    norm_launcher = launchers["gated_rms_norm_triton"].gated_rms_norm_triton
    rows = {
        "memory_decode_'s argument checks": lambda: decode_op._checked(*decode),
        "the layer's check of its cache entry": lambda: layer._check_state(state, q),
        "memory_decode launcher (2 launches)": lambda: decode_launcher(*decode),
        "route launcher": lambda: route_launcher(logits, config.topk, config.shared_mem),
        "gated norm launcher": lambda: norm_launcher(*norm),
        "ops.route (checks, launcher)": lambda: ops.route(logits, config.topk, config.shared_mem),
        "mom::route called directly (launcher)": lambda: call(route_op, logits, config.topk,
                                                              config.shared_mem),
        "ops.gated_rms_norm (checks, launcher)": lambda: ops.gated_rms_norm(*norm),
        "mom::gated_rms_norm called directly (launcher)": lambda: call(norm_op, *norm),
    }
    if not hasattr(layer, "_check_state"):  # a tree before the layer checked its cache entry itself
        del rows["the layer's check of its cache entry"]
    print(f"# {cpu_model()}, torch {torch.__version__}, commit {tree_commit()}; host us a call, fastest of "
          f"{args.rounds} x "
          f"{args.calls} calls, kernels replaced by no-ops")
    print("| piece | us |\n| --- | --- |")
    with torch.no_grad():
        for name, fn in rows.items():
            for _ in range(100):
                fn()
            best = min(timeit.repeat(fn, number=args.calls, repeat=args.rounds)) / args.calls
            print(f"| {name} | {best * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
