"""Decode latency on a GPU: ms per decode step (a token for each sequence) after a 512-token
prompt, batch 1 and 64, for the paper's 340M MoM config with random bf16 weights: eager,
torch.compile, and CUDA graphs (torch.compile mode="reduce-overhead"); and the prefill of the
prompt (ms: eager, compiled, and replayed from a CUDA graph into a reused cache, the last also as
the GPU's time alone).
Peers in the same run: a Transformer of the same width and depth with a static KV cache through
scaled_dot_product_attention (its decode steps and its prefill, compiled the same ways), and the
reference implementation's generate() (flash-linear-attention), when it imports.

    python benchmarks/decode.py [--batches 1 64] [--steps 64] [--prompt 512]
    python benchmarks/decode.py --profile    # GPU time per kernel of a compiled step and prefill
    python benchmarks/decode.py --inductor coordinate_descent_tuning=True   # Inductor settings, both models
"""
from __future__ import annotations

import argparse
import ast

import torch
import torch.nn as nn
import torch.nn.functional as F
from gpu_timing import bench, kernel_table
from tree_commit import tree_commit

from mom_compile import MomConfig, MomForCausalLM
from mom_compile.cli_args import int_at_least
from mom_compile.graphs.generation import CudaGraphStep

# eager-graph: the eager step replayed from a CUDA graph, as generate() does without torch.compile
MODES = {"eager": None, "eager-graph": "graph", "compiled": "default", "cudagraphs": "reduce-overhead"}


class StaticKVTransformer(nn.Module):
    """Pre-norm Transformer LM with a preallocated KV cache (the gpt-fast pattern), as a peer."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, mlp: int, max_len: int, batch: int):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.RMSNorm(d), qkv=nn.Linear(d, 3 * d, bias=False), o=nn.Linear(d, d, bias=False),
            n2=nn.RMSNorm(d), up=nn.Linear(d, 2 * mlp, bias=False), down=nn.Linear(mlp, d, bias=False),
        )) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        shape = (layers, batch, heads, max_len, d // heads)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    @classmethod
    def twin(cls, config: MomConfig, max_len: int, batch: int) -> StaticKVTransformer:
        """The peer of a MoM config: its width, depth, MLP and vocabulary, 64-wide heads, bf16 on the GPU."""
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.hidden_size // 64,
                   config.mlp_size, max_len, batch).cuda().to(torch.bfloat16)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits of the tokens `ids` at positions `pos` (the last logits_to_keep of them, 0: all),
        their keys and values written into the cache."""
        b, t = ids.shape
        h = self.emb(ids)
        visible = torch.arange(self.max_len, device=ids.device)[None, :] <= pos[:, None]  # [t, max_len]
        for i, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["n1"](h)).view(b, t, 3, self.heads, -1).unbind(2)
            self.k_cache[i].index_copy_(2, pos, k.transpose(1, 2))
            self.v_cache[i].index_copy_(2, pos, v.transpose(1, 2))
            a = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[i], self.v_cache[i],
                                               attn_mask=visible)
            h = h + blk["o"](a.transpose(1, 2).flatten(2))
            gate, up = blk["up"](blk["n2"](h)).chunk(2, -1)
            h = h + blk["down"](F.silu(gate) * up)
        return self.head(self.norm(h[:, -logits_to_keep:] if logits_to_keep else h))


def time_steps(step, first_token: torch.Tensor, steps: int) -> float:
    """Mean ms per step over `steps` greedy steps, timed with CUDA events after warm-up."""
    tok = first_token
    for _ in range(3):
        tok = step(tok)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        tok = step(tok)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def bench_mom(model: MomForCausalLM, batch: int, prompt: int, steps: int, mode: str | None) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    cache = model.new_cache(batch)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if mode == "graph":
        graphed = CudaGraphStep(model, cache)
    else:
        forward = model.forward if mode is None else torch.compile(model.forward, mode=mode, fullgraph=True)
        graphed = None

    @torch.no_grad()
    def step(tok):
        logits = graphed(tok) if graphed else forward(tok, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    return time_steps(step, out.logits[:, -1].argmax(-1, keepdim=True), steps)


def prefill_times(prefill, mode: str | None) -> dict[str, float]:
    """{"": median ms of prefill()}, and replayed from a CUDA graph (mode "reduce-overhead") also
    {", GPU time": the GPU's time alone (`gpu_timing.bench`'s queued)}: how much of the latency is
    the host's."""
    times = {"": bench(prefill, warmup=3, iters=5)[0]}
    if mode == "reduce-overhead":
        times[", GPU time"] = bench(prefill, warmup=1, iters=5, queued=True)[0]
    return times


def bench_prefill(model: MomForCausalLM, batch: int, prompt: int, mode: str | None) -> dict[str, float]:
    """`prefill_times` of one prefill of `prompt` tokens: eager or compiled (mode "default") into a
    new cache each time, its allocation included; "reduce-overhead" into one cache reset each time
    (as generate(cache=...) does), whose fixed addresses let the prefill replay from a CUDA graph."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    forward = model.forward if mode is None else torch.compile(model.forward, mode=mode, fullgraph=True)
    reused = model.new_cache(batch) if mode == "reduce-overhead" else None

    def prefill():
        cache = model.new_cache(batch) if reused is None else reused
        cache.reset()
        forward(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        return prefill_times(prefill, mode)


def bench_transformer_prefill(config: MomConfig, batch: int, prompt: int,
                              mode: str | None) -> dict[str, float]:
    """`prefill_times` of the Transformer peer's prefill of `prompt` tokens into its static KV
    cache, the last position's logits only (as MoM's): eager, compiled, or replayed from a CUDA
    graph."""
    model = StaticKVTransformer.twin(config, prompt + 8, batch)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    pos = torch.arange(prompt, device="cuda")
    forward = model if mode is None else torch.compile(model, mode=mode, fullgraph=True)
    with torch.no_grad():
        return prefill_times(lambda: forward(ids, pos, logits_to_keep=1), mode)


@torch.no_grad()
def profile_mom(model: MomForCausalLM, batch: int, prompt: int) -> None:
    """The kernels of one compiled decode step, the host time per op of one eager step (its launches
    outlast its kernels: the launch rows count them), then the kernels of one compiled prefill (mode
    "default": the kernels that mode "reduce-overhead" replays from a CUDA graph, launched one by
    one) and its host time per op (at batch 1 its launches outlast its kernels too)."""
    forward = torch.compile(model.forward, fullgraph=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    cache = model.new_cache(batch)
    forward(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    print(f"\nbatch {batch}: one compiled decode step\n"
          + kernel_table(lambda: forward(tok, past_key_values=cache, use_cache=True), rows=20))
    print(f"batch {batch}: one eager decode step's host time per op\n"
          + kernel_table(lambda: model(tok, past_key_values=cache, use_cache=True), rows=20, host=True))

    def prefill():
        forward(ids, past_key_values=model.new_cache(batch), use_cache=True, logits_to_keep=1)

    print(f"batch {batch}: one compiled prefill of {prompt} tokens\n" + kernel_table(prefill, rows=20))
    print(f"batch {batch}: the same prefill's host time per op\n" + kernel_table(prefill, rows=20, host=True))


def bench_transformer(config: MomConfig, batch: int, prompt: int, steps: int, mode: str | None) -> float:
    model = StaticKVTransformer.twin(config, prompt + steps + 8, batch)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    with torch.no_grad():
        logits = model(ids, torch.arange(prompt, device="cuda"))
    forward = model if mode is None else torch.compile(model, mode=mode, fullgraph=True)
    pos = torch.tensor([prompt], device="cuda")

    @torch.no_grad()
    def step(tok):
        out = forward(tok, pos)
        pos.add_(1)
        return out[:, -1].argmax(-1, keepdim=True)

    return time_steps(step, logits[:, -1].argmax(-1, keepdim=True), steps)


def bench_reference(config: MomConfig, batch: int, prompt: int, steps: int) -> float | str:
    try:
        from fla.models import MomConfig as RefConfig
        from fla.models import MomForCausalLM as RefModel
    except ImportError as e:
        return f"not importable ({e.__class__.__name__})"
    ref_config = RefConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                           num_heads=config.num_heads, head_dim=config.head_dim, expand_v=config.expand_v,
                           num_memories=config.num_memories, topk=config.topk, shared_mem=config.shared_mem,
                           hidden_ratio=config.hidden_ratio, vocab_size=config.vocab_size)
    model = RefModel(ref_config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    try:
        run(4)
        return (run(steps + 1) - run(1)) / steps  # the prefill cancels out
    except Exception as e:  # record the reference's refusal instead of hiding it
        return f"failed: {e.__class__.__name__}: {str(e).splitlines()[0][:80]}"


def inductor_setting(text: str) -> tuple[str, object]:
    """NAME=VALUE of torch._inductor.config, VALUE a Python literal."""
    name, sep, value = text.partition("=")
    if not sep or not hasattr(torch._inductor.config, name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, NAME in torch._inductor.config: {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{name}: expected a Python literal, got {value!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int_at_least(1), nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int_at_least(1), default=64)
    parser.add_argument("--prompt", type=int_at_least(1), default=512)
    parser.add_argument("--config", default="340m")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="which ways to run the decode step (default: all; none: skip)")
    parser.add_argument("--no-reference", action="store_true", help="skip the fla generate() peer")
    parser.add_argument("--prefill-modes", nargs="*", default=["eager", "compiled", "cudagraphs"],
                        choices=["eager", "compiled", "cudagraphs"],
                        help="how to time the prompt's prefill (default all three; none: skip)")
    parser.add_argument("--no-transformer", action="store_true", help="skip the Transformer peer")
    parser.add_argument("--inductor", nargs="+", default=[], type=inductor_setting, metavar="NAME=VALUE",
                        help="torch._inductor.config settings for every compiled mode of both models, "
                             "e.g. coordinate_descent_tuning=True (one-row matmuls become tuned "
                             "reductions) or max_autotune_gemm=True")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: GPU time per kernel of a compiled step and prefill")
    args = parser.parse_args()
    for name, value in args.inductor:
        setattr(torch._inductor.config, name, value)
    torch.manual_seed(0)
    config = MomConfig.preset(args.config)
    model = MomForCausalLM(config).cuda().to(torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | commit {tree_commit()} | "
          f"config {args.config} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, bf16) | "
          f"prompt {args.prompt} | {args.steps} timed greedy steps | "
          f"inductor {dict(args.inductor) or 'defaults'}")
    if args.profile:
        for batch in args.batches:
            torch._dynamo.reset()
            profile_mom(model, batch, args.prompt)
        return
    rows = []

    def add(batch: int, name: str, ms: float | str) -> None:
        rows.append((batch, name, ms))
        print(f"  measured: batch {batch} {name}: {ms}", flush=True)

    for batch in args.batches:
        for name, mode in MODES.items():
            if name not in args.prefill_modes:
                continue
            torch._dynamo.reset()
            for suffix, ms in bench_prefill(model, batch, args.prompt, mode).items():
                add(batch, f"MoM prefill of {args.prompt}, {name}{suffix}", ms)
            if not args.no_transformer:
                torch._dynamo.reset()
                for suffix, ms in bench_transformer_prefill(config, batch, args.prompt, mode).items():
                    add(batch, f"Transformer prefill of {args.prompt}, {name}{suffix}", ms)
        for name, mode in MODES.items():
            if name not in args.modes:
                continue
            torch._dynamo.reset()
            add(batch, f"MoM {name}", bench_mom(model, batch, args.prompt, args.steps, mode))
            if not args.no_transformer and mode != "graph":  # its CUDA-graph row is "cudagraphs"
                torch._dynamo.reset()
                add(batch, f"Transformer+SDPA {name}",
                    bench_transformer(config, batch, args.prompt, args.steps, mode))
        if not args.no_reference:
            add(batch, "reference fla generate", bench_reference(config, batch, args.prompt, args.steps))
    print(f"\n{'batch':>5}  {'implementation':50} {'ms':>10} "
          " (per step: a token for each sequence; a prefill row: per prefill)")
    for batch, name, ms in rows:
        value = f"{ms:>10.3f}" if isinstance(ms, float) else ms
        print(f"{batch:>5}  {name:50} {value}")


if __name__ == "__main__":
    main()
