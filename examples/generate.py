"""Build a small MoM model with random weights, compile it, and generate.

    python examples/generate.py [--layers 4] [--tokens 32]

Prints the tokens of eager and compiled generation (they must agree) and their speeds.
"""
from __future__ import annotations

import argparse
import time

import torch

from mom_compile import MomConfig, MomForCausalLM


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=positive, default=4, help="number of MoM blocks (default 4)")
    parser.add_argument("--tokens", type=positive, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = MomConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=args.layers, num_heads=2,
                       head_dim=32, num_memories=4, topk=2, shared_mem=True)
    model = MomForCausalLM(config).eval()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{config.num_memories} memories (top-{config.topk} + shared), {config.num_hidden_layers} layers")
    prompt = torch.randint(0, config.vocab_size, (2, 12))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # the second prompt is left-padded

    start = time.perf_counter()
    eager = model.generate(prompt, attention_mask=mask, max_new_tokens=args.tokens)
    eager_s = time.perf_counter() - start

    print("compiling forward (fullgraph) ...", flush=True)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True)
    start = time.perf_counter()
    compiled = model.generate(prompt, attention_mask=mask, max_new_tokens=args.tokens)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, attention_mask=mask, max_new_tokens=args.tokens)
    warm_s = time.perf_counter() - start

    print("generated (compiled):", compiled[:, prompt.shape[1]:].tolist())
    print(f"eager {args.tokens / eager_s:.1f} tok/s | compiled: first call {first_s:.1f} s "
          f"(compilation), then {args.tokens / warm_s:.1f} tok/s")
    if not torch.equal(eager, compiled):
        raise SystemExit("error: compiled generation differs from eager generation")
    print("ok: compiled and eager generation agree")


if __name__ == "__main__":
    main()
