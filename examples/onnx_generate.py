"""Generate token ids with an exported MoM model, using onnxruntime only (no torch).

    python -m mom_compile.export --onnx out/tiny
    python examples/onnx_generate.py out/tiny --prompt 5,17,42 --prompt 7 --max-new-tokens 32
    python examples/onnx_generate.py out/tiny --prompt 5,17,42 --sample --top-k 50 --seed 1

With --tensorrt the same loop runs the TensorRT engines of a `--tensorrt` export instead (needs
tensorrt and cuda-python, and a GPU):

    python -m mom_compile.export --tensorrt out/trt
    python examples/onnx_generate.py out/trt --tensorrt --prompt 5,17,42

Several --prompt options form one batch; shorter prompts are left-padded (attention mask 0).
Prompts are token ids: pair this with the checkpoint's tokenizer for text.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mom_compile.cli_args import int_at_least  # noqa: E402
from mom_compile.export.runtime import OnnxGenerator  # noqa: E402


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if min(ids) < 0 or max(ids) >= 2**63:
        raise argparse.ArgumentTypeError(f"expected token ids >= 0, got {text!r}")
    return ids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="an export folder written by python -m mom_compile.export")
    p.add_argument("--prompt", action="append", required=True, metavar="IDS", type=token_ids,
                   help="comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy argmax")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--top-k", type=int_at_least(0), default=None, help="with --sample; 0: no cut")
    p.add_argument("--top-p", type=float, default=None, help="with --sample, in (0, 1]")
    p.add_argument("--seed", type=int_at_least(0), default=None)
    p.add_argument("--tensorrt", action="store_true", help="run the folder's TensorRT engines")
    args = p.parse_args()
    prompts = args.prompt
    try:
        if args.tensorrt:
            from mom_compile.export.tensorrt_runtime import TensorRTGenerator

            gen = TensorRTGenerator(args.folder)
        else:
            gen = OnnxGenerator(args.folder)
        pad = gen.manifest.get("pad_token_id") or 0
        ids, mask = left_pad(prompts, pad)
        out = gen.generate(ids, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, row in zip(prompts, out):
        print(" ".join(map(str, prompt)), "->", " ".join(map(str, row[ids.shape[1]:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
