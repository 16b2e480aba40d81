"""Where an eager decode step's host time goes: microseconds of host time per call of the step,
one block, and each piece of a block, at the 340m config (bf16) on a GPU, then the Python
functions that take the most time over a few steps (cProfile).

An eager decode step is bound by the host: launching its kernels from Python takes longer than
running them. Each piece is called in loops without syncs, so a loop's time
per call is the host's (the GPU keeps up), and the fastest loop is kept. The op rows compare the
checked wrapper, the registered op and the kernel function called directly, which separates the
cost of the checks, of torch's dispatcher and of the Triton launch; then the whole step with the
direct op calls, with every op call through the dispatcher, with Triton's own launches instead of
`ops/launch.py`'s, and the eager step of a plain-torch Transformer twin (the peer), alternating;
and the launchers and the layer with either launch, alternating.

    python benchmarks/host_overhead.py [--batch 1] [--rounds 9] [--profile-steps 20]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from decode import StaticKVTransformer
from host import cpu_model
from tree_commit import tree_commit

from mom_compile import MomConfig, MomForCausalLM, ops
from mom_compile.ops import direct_call, gated_rms_norm_triton, memory_decode_triton, route_triton
from mom_compile.ops.launch import launch


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < n), mask=i < n)


def host_us(fn, rounds: int) -> float:
    """Host microseconds per call of fn: the fastest of `rounds` loops of calls without syncs
    (about 50 ms each), after warm-up. The host's noise (other work on the machine) only ever adds
    time, so the fastest loop is the steadiest estimate."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    calls = max(3, int(0.05 / (time.perf_counter() - start)))
    best = math.inf
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    return best * 1e6


def transformer_step(config: MomConfig, batch: int):
    """One eager decode step of decode.py's Transformer peer at config's width, depth and MLP
    (after a 16-token prompt; the position stays put: the host's work is the same)."""
    twin = StaticKVTransformer.twin(config, 32, batch)
    twin(torch.randint(0, config.vocab_size, (batch, 16), device="cuda"), torch.arange(16, device="cuda"))
    tok, pos = torch.zeros(batch, 1, dtype=torch.int64, device="cuda"), torch.tensor([16], device="cuda")
    return lambda: twin(tok, pos)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9, help="timed loops a row (the fastest is shown)")
    parser.add_argument("--profile-steps", type=int, default=20, help="0: no cProfile")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = MomConfig.preset("340m")
    model = MomForCausalLM(config).cuda().to(torch.bfloat16).eval()
    b = args.batch
    cache = model.new_cache(b)
    ids = torch.randint(0, config.vocab_size, (b, 16), device="cuda")
    model(ids, past_key_values=cache, use_cache=True)
    tok = ids[:, -1:]
    block, state = model.model.layers[0], cache[0]
    layer = block.attn
    h = model.model.embeddings(tok)
    x = block.attn_norm(h)
    logits, q, z, per_set = layer.project(x)
    memory_idx, weights = layer.route(logits)
    decode_args = (q[:, 0], per_set[:, 0], memory_idx[:, 0], layer.A_log, layer.dt_bias,
                   layer.conv_weight.squeeze(1), layer.conv_bias, state.conv, state.recurrent, layer.scale,
                   config.single_kv_proj)
    o = ops.memory_decode_(*decode_args)
    norm_args = (o[:, None], z, layer.o_norm.weight, layer.o_norm.eps, x.dtype, weights)
    normed = ops.gated_rms_norm(*norm_args)
    src = torch.zeros(1024, device="cuda")
    dst = torch.empty_like(src)
    hidden = model.model(tok, None, cache)[0]

    def each_block():
        for blk, st in zip(model.model.layers, cache):
            blk(h, None, st)

    pieces = {
        "eager decode step (whole model)": lambda: model(tok, past_key_values=cache, use_cache=True),
        "  input and cache checks": lambda: model._check_inputs(tok, None, None, cache),
        "  backbone (model.model)": lambda: model.model(tok, None, cache),
        "  every block once, on one input": each_block,
        "  lm_head": lambda: model.lm_head(hidden),
        "one block": lambda: block(h, None, state),
        "  attn_norm (RMSNorm)": lambda: block.attn_norm(h),
        "  MomLayer.forward": lambda: layer(x, None, state),
        "    project (in_proj GEMM + split)": lambda: layer.project(x),
        "    ops.route": lambda: layer.route(logits),
        "    torch.ops.mom.route": lambda: torch.ops.mom.route(logits, config.topk, config.shared_mem),
        "    route_triton": lambda: route_triton.route_triton(logits, config.topk, config.shared_mem),
        "    ops.memory_decode_": lambda: ops.memory_decode_(*decode_args),
        "    torch.ops.mom.memory_decode_": lambda: torch.ops.mom.memory_decode_(*decode_args),
        "    memory_decode_triton_": lambda: memory_decode_triton.memory_decode_triton_(*decode_args),
        "    ops.gated_rms_norm, mixing the memories": lambda: ops.gated_rms_norm(*norm_args),
        "    torch.ops.mom.gated_rms_norm": lambda: torch.ops.mom.gated_rms_norm(*norm_args),
        "    gated_rms_norm_triton": lambda: gated_rms_norm_triton.gated_rms_norm_triton(*norm_args),
        "    o_proj": lambda: layer.o_proj(normed.flatten(2)),
        "  residual add": lambda: h + h,
        "  MomMLP": lambda: block.mlp(h),
        "F.linear, in_proj's shape": lambda: F.linear(x, layer.in_proj),
        "x.clone()": lambda: h.clone(),
        "a trivial Triton launch": lambda: _copy_kernel[(1,)](src, dst, 1024, BLOCK=1024),
        "  the same through ops.launch": lambda: launch(_copy_kernel, (1,), src, dst, 1024, BLOCK=1024),
    }
    print(f"device: {torch.cuda.get_device_name()} | host: {cpu_model()} | torch {torch.__version__} | "
          f"triton {triton.__version__} | commit {tree_commit()} | 340m config, bf16, batch {b} | "
          f"fastest of {args.rounds} loops a row")
    print(f"\n{'piece':44} {'host us a call':>15}")
    for name, fn in pieces.items():
        print(f"{name:44} {host_us(fn, args.rounds):15.1f}", flush=True)
    print("\nthe whole step, ms, with direct op calls / every op call through the dispatcher "
          "(ops/direct_call.py) / Triton's own launches (not ops/launch.py's), and the peer: the "
          "eager step of a Transformer of the same width, depth and MLP with a static KV cache "
          "(decode.py's), all plain torch ops; alternating in this process:")
    step, kernel = pieces["eager decode step (whole model)"], direct_call._kernel
    twin = transformer_step(config, b)
    launchers = (route_triton, memory_decode_triton, gated_rms_norm_triton)

    def triton_launch(kernel, grid, *args, **constexprs):
        kernel[grid](*args, **constexprs)

    def launch_with(fn):
        for module in launchers:
            module.launch = fn

    times = {"direct": [], "dispatcher": [], "Triton's launch": [], "Transformer": []}
    for _ in range(args.rounds):
        times["direct"].append(host_us(step, 1) / 1e3)
        direct_call._kernel = lambda op, args: None
        times["dispatcher"].append(host_us(step, 1) / 1e3)
        direct_call._kernel = kernel
        launch_with(triton_launch)
        times["Triton's launch"].append(host_us(step, 1) / 1e3)
        launch_with(launch)
        times["Transformer"].append(host_us(twin, 1) / 1e3)
    for name, ms in times.items():
        print(f"  {name:15} fastest {min(ms):7.2f}, median {statistics.median(ms):7.2f}")
    print("\nthe launchers and the layer, us, with ops/launch.py's launches / Triton's own, alternating:")
    rows = [name for name in pieces if name.strip() in (
        "MomLayer.forward", "route_triton", "memory_decode_triton_", "gated_rms_norm_triton")]
    times = {(name, how): [] for name in rows for how in ("ops.launch", "Triton")}
    ways = [("ops.launch", launch), ("Triton", triton_launch)]
    for i in range(args.rounds):
        for how, fn in ways[::-1] if i % 2 else ways:  # each first in every other round
            launch_with(fn)
            for name in rows:
                times[(name, how)].append(host_us(pieces[name], 1))
    launch_with(launch)
    for (name, how), us in times.items():
        print(f"  {name.strip():22} {how:10} fastest {min(us):7.1f}, median {statistics.median(us):7.1f}")
    if args.profile_steps:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.profile_steps):
            model(tok, past_key_values=cache, use_cache=True)
        profiler.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(f"\ncProfile of {args.profile_steps} eager steps, by own time:\n" + out.getvalue())

if __name__ == "__main__":
    main()
