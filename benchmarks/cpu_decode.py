"""Decode-step latency on this CPU: ms per generated token (median over many steps) at batch 1 and
16, for MoM models with random float32 weights, all peers in one run:

  onnxruntime   decode_step.onnx (python -m mom_compile.export's graph), CPU provider, states fed
                back as numpy arrays: present.X -> past.X
  eager         MomForCausalLM.forward with its in-place MomCache
  compiled      torch.compile(model.forward, fullgraph=True), same cache
  AOTInductor   decode_step.aoti.pt2 (python -m mom_compile.export --aoti), states fed back

Each peer decodes greedily from the same state (a PyTorch prefill of a random prompt); the
first-step logits of every peer are compared with eager's (column "max |dlogits|"). Only the
decode-step graph is exported (prefill is not needed here, and exporting it would double the
export time of large configs).

    python benchmarks/cpu_decode.py [--configs tiny 340m] [--batches 1 16] [--steps 64]
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
import warnings
from functools import partial

import onnxruntime as ort
import torch
from host import cpu_model
from tree_commit import tree_commit

from mom_compile import MomCache, MomConfig, MomForCausalLM
from mom_compile.export.aoti import Package, build_packages, compiler
from mom_compile.export.onnx_export import DECODE, export_onnx, export_programs, graph_specs

PROMPT = 32


def time_steps(step, token, states, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) ms of step(token, states) -> (token, states), greedy."""
    for _ in range(warmup):
        token, states = step(token, states)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token, states = step(token, states)
        times.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(times, n=10)
    return statistics.median(times), deciles[0], deciles[-1]


def prefill_states(model: MomForCausalLM, batch: int, seed: int):
    """First token and the state after a random PROMPT-token prompt: where every peer starts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=gen)
    cache = model.new_cache(batch)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1:].argmax(-1), [t.clone() for t in cache.states()]


def cache_from(model: MomForCausalLM, states) -> MomCache:
    cache = model.new_cache(states[0].shape[0])
    for mine, given in zip(cache.states(), states):
        mine.copy_(given)
    return cache


def torch_peer(model: MomForCausalLM, compiled: bool):
    """step over a MomCache that the model advances in place (how generate() decodes)."""
    forward = torch.compile(model.forward, fullgraph=True) if compiled else model.forward

    def step(token, cache):
        with torch.inference_mode():
            logits = forward(token, past_key_values=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1), cache

    def first_logits(token, states):
        return forward(token, past_key_values=cache_from(model, states), use_cache=True).logits

    return partial(cache_from, model), step, first_logits


def ort_peer(path: str, config: MomConfig):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    spec = graph_specs(config)[DECODE]

    def make(states):
        return [t.numpy() for t in states]

    def run(token, states):
        return session.run(spec.outputs, dict(zip(spec.inputs, [token, *states])))

    def step(token, states):
        logits, *states = run(token, states)
        return logits[:, -1:].argmax(-1), states

    return make, step, lambda token, states: torch.from_numpy(run(token.numpy(), make(states))[0])


def aoti_peer(path: str):
    package = Package(path)

    def step(token, states):
        logits, *states = package(token, states)
        return logits[:, -1:].argmax(-1), states

    return list, step, lambda token, states: package(token, states)[0]


def bench_config(name: str, batches, steps: int, warmup: int, use_aoti: bool, out_dir: str) -> None:
    """Prints the config's rows as they are measured. One peer lives at a time: the 340m config
    (2.2 GB of float32 weights) ran out of 23 GB with all four peers' copies of the weights."""
    torch.manual_seed(0)
    model = MomForCausalLM(MomConfig.preset(name)).eval()
    config = model.config
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    setup = {}

    def stage(what: str) -> float:  # the exports take minutes at 340m: say what runs
        print(f"{name}: {what}...", flush=True)
        return time.perf_counter()
    start = stage("torch.export of the decode step")
    programs = export_programs(model, graphs=(DECODE,))
    setup["torch.export"] = time.perf_counter() - start
    start = stage("ONNX export")
    onnx_path = export_onnx(model, folder, programs=programs, progress=lambda _: None)[DECODE]
    setup["ONNX export"] = time.perf_counter() - start
    peers = {"onnxruntime": partial(ort_peer, onnx_path, config), "eager": partial(torch_peer, model, False),
             "compiled": partial(torch_peer, model, True)}
    if use_aoti:
        start = stage("AOTInductor build")
        aoti_path = build_packages(programs, folder, progress=lambda _: None)[DECODE]
        setup["AOTI build"] = time.perf_counter() - start
        peers["AOTInductor"] = partial(aoti_peer, aoti_path)
    del programs
    gc.collect()
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params / 1e6:.1f}M params, d={config.hidden_size} layers={config.num_hidden_layers} "
          f"H={config.num_heads} K={config.head_dim} M={config.num_memories} top-{config.topk} "
          f"shared={config.shared_mem} vocab={config.vocab_size}\n"
          f"setup: {', '.join(f'{k} {v:.1f}s' for k, v in setup.items())}")
    print(f"{'batch':>5}  {'peer':12} {'median':>9} {'p10':>9} {'p90':>9} {'tokens/s':>9} "
          f"{'max |dlogits|':>13} {'first call':>10}", flush=True)
    starts = {}
    for batch in batches:
        token, states = prefill_states(model, batch, seed=batch)
        with torch.inference_mode():
            reference = model(token, past_key_values=cache_from(model, states), use_cache=True).logits
        starts[batch] = token, states, reference
    for peer, build in peers.items():
        make, step, first_logits = build()
        for batch, (token, states, reference) in starts.items():
            start = time.perf_counter()
            with torch.inference_mode():
                diff = (first_logits(token, states) - reference).abs().max().item()
            first = time.perf_counter() - start  # includes torch.compile's compilation
            given = token.numpy() if peer == "onnxruntime" else token
            median, p10, p90 = time_steps(step, given, make(states), warmup, steps)
            print(f"{batch:>5}  {peer:12} {median:>9.3f} {p10:>9.3f} {p90:>9.3f} "
                  f"{batch * 1e3 / median:>9.0f} {diff:>13.2e} {first:>9.2f}s", flush=True)
        del make, step, first_logits
        torch._dynamo.reset()
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "340m"], choices=["tiny", "340m", "1.3b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=64, help="timed greedy steps per peer and batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package")
    parser.add_argument("--out", default=None, help="folder for the artefacts (default: a temporary one)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: expected at least 2")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    use_aoti = not args.no_aoti and compiler() is not None
    out_dir = args.out or tempfile.mkdtemp(prefix="mom_cpu_decode_")
    print(f"cpu: {cpu_model()} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | onnxruntime {ort.__version__} | "
          f"commit {tree_commit()} | float32, prompt {PROMPT}, {args.warmup} warm-up + {args.steps} timed "
          f"greedy steps, ms per step", flush=True)
    for name in args.configs:
        bench_config(name, args.batches, args.steps, args.warmup, use_aoti, out_dir)
    if not use_aoti and not args.no_aoti:
        print("\nAOTInductor: skipped, no C++ compiler on PATH")


if __name__ == "__main__":
    main()
