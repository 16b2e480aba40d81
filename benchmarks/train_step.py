"""A whole training step on the GPU: forward, backward and AdamW of the 340m preset (545M
parameters), compiled, against its Transformer twin (benchmarks/peers.py: the same width, heads,
MLP and vocabulary with SDPA attention) in the same run, and MoM again with gradient checkpointing
(each block recomputed in the backward, or only the scans' chunk states). Prints tokens per second
and peak memory per sequence length, with the card, the commit and the shapes.

Both models keep float32 parameters and AdamW states (fused AdamW) and compute under bf16 autocast;
each block is compiled (torch.compile(fullgraph=True, dynamic=False) per block, as large models are
trained: one static graph per T serves every block); each step sees --tokens tokens (batch =
tokens / T) of random ids; the first --warmup steps (compilation, autotuning) are not timed. The
loss printed is the last step's on that one repeated batch: a sanity check (finite, falling), not a
comparison of the models.

    python benchmarks/train_step.py [--ts 2048 8192 32768] [--tokens 32768] [--steps 10]
                                    [--checkpointing blocks scan_states]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from peers import TransformerLM  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig, MomForCausalLM  # noqa: E402
from mom_compile.cli_args import check_batch_layouts  # noqa: E402
from mom_compile.graphs.model import CHECKPOINTING_SCOPES  # noqa: E402


def mom(config: MomConfig, checkpointing: str | None = None):
    model = MomForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(checkpointing)
    for block in model.model.layers:
        block.compile(fullgraph=True, dynamic=False)
    return model, lambda ids: model(ids, labels=ids).loss


def transformer(config: MomConfig):
    model = TransformerLM(config)
    for block in model.blocks:
        block.compile(fullgraph=True, dynamic=False)
    return model, lambda ids: model(ids, ids)


def run(name: str, build, t: int, tokens: int, steps: int, warmup: int) -> dict:
    """Median step time and peak memory of one model at one T; a failure is recorded, not raised."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # a fresh static graph per row (blocks of every row share one code object)
    torch.cuda.reset_peak_memory_stats()
    batch = max(1, tokens // t)
    model = opt = step_loss = None
    try:
        model, step_loss = build()
        model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (batch, t), device="cuda")
        times, start = [], time.perf_counter()
        for i in range(warmup + steps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_loss(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(begin.elapsed_time(end))
        ms = statistics.median(times)
        row = dict(name=name, t=t, batch=batch, ms=ms, tokens_per_s=batch * t / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=loss.item(),
                   wall_s=time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        row = dict(name=name, t=t, batch=batch, error=f"out of memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # a failure is a result: report it, go on with the next row
        row = dict(name=name, t=t, batch=batch, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        model = opt = step_loss = None
        gc.collect()
        torch.cuda.empty_cache()
    said = row.get("error") or (f"{row['ms']:.1f} ms/step, {row['tokens_per_s'] / 1e3:.1f}K tok/s, "
                                f"peak {row['peak_gib']:.1f} GiB, loss {row['loss']:.3f}")
    print(f"  T={t} B={batch} {name}: {said}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step (default 32768)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--config", default="340m", choices=("tiny", "340m", "1.3b"))
    p.add_argument("--checkpointing", nargs="*", default=list(CHECKPOINTING_SCOPES),
                   choices=CHECKPOINTING_SCOPES,
                   help="MoM rows with gradient checkpointing of these scopes (default: both)")
    args = p.parse_args()
    check_batch_layouts(p, args.tokens, args.ts)
    if not torch.cuda.is_available():
        sys.exit("train_step.py needs a CUDA device")
    config = MomConfig.preset(args.config)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {tree_commit()}; "
          f"preset {args.config}: d={config.hidden_size}, {config.num_hidden_layers} layers, "
          f"H={config.num_heads}, K={config.head_dim}, M={config.num_memories}, top-{config.topk}"
          f"{' + shared' if config.shared_mem else ''}; {args.tokens} tokens/step", flush=True)
    rows = []
    for t in args.ts:
        rows.append(run("MoM", lambda: mom(config), t, args.tokens, args.steps, args.warmup))
        for scope in args.checkpointing:
            rows.append(run(f"MoM, gradient checkpointing ({scope})", lambda scope=scope: mom(config, scope),
                            t, args.tokens, args.steps, args.warmup))
        rows.append(run("Transformer (SDPA)", lambda: transformer(config), t, args.tokens, args.steps,
                        args.warmup))
    print("\n| T | B | model | ms/step | tokens/s | peak GiB |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['t']} | {r['batch']} | {r['name']} | {r['error']} | | |")
        else:
            print(f"| {r['t']} | {r['batch']} | {r['name']} | {r['ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f}K "
                  f"| {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
