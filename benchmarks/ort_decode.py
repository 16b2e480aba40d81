"""Decode latency in onnxruntime's CUDA provider against our torch decode, in the same process.

The 340m preset (random weights, seed 0) is exported once with `python -m mom_compile.export`
(--dtype float16 by default: the provider has no bfloat16 MatMul) into FOLDER, then for each batch:
  - torch: the same weights in bf16, the decode step replayed from a CUDA graph (what generate()
    does without torch.compile), ms per step (first, while the GPU's memory is free);
  - onnxruntime: `OnnxBackend` on the CUDA provider (states I/O-bound on the GPU, only the
    logits come back per step), ms per decode step after a prefill of --prompt tokens, with the
    step launched node by node and replayed from the provider's CUDA graphs.
Both bring the last logits to the host and pick the next token there every step, as the
generation loops do. Run with onnxruntime-gpu installed.

    python benchmarks/ort_decode.py [--folder DIR] [--batches 1 64] [--steps 32]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig, MomForCausalLM  # noqa: E402
from mom_compile.export.manifest import read_manifest  # noqa: E402
from mom_compile.export.runtime import OnnxBackend  # noqa: E402
from mom_compile.graphs.generation import CudaGraphStep  # noqa: E402


def export(folder: str, config: str, dtype: str, seed: int) -> None:
    """Export unless `folder` holds this config's export in this dtype already."""
    if os.path.isfile(os.path.join(folder, "model.json")):
        manifest = read_manifest(folder)
        if manifest["dtype"] == dtype and manifest["config"] == MomConfig.preset(config).to_dict():
            return
        sys.exit(f"--folder: {folder} holds another export ({manifest['dtype']}); name an empty folder")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mom_compile.export", "--onnx", folder, "--config", config,
                    "--dtype", dtype, "--seed", str(seed)], check=True, cwd=ROOT)
    print(f"exported {config} ({dtype}) to {folder} in {time.perf_counter() - start:.0f} s", flush=True)


# untimed steps first: onnxruntime captures a CUDA graph at a graph id's second run, and the two
# state sets alternate two ids
WARMUP = 8


def time_ort(backend: OnnxBackend, batch: int, prompt: int, steps: int, vocab: int) -> float:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, prompt), dtype=np.int64)
    logits = backend.prefill(ids, np.ones_like(ids))
    for _ in range(WARMUP):
        logits = backend.step(logits.argmax(-1)[:, None].astype(np.int64))
    start = time.perf_counter()
    for _ in range(steps):  # the logits come back to the host every step, as generation needs them
        logits = backend.step(logits.argmax(-1)[:, None].astype(np.int64))
    return (time.perf_counter() - start) / steps * 1e3


@torch.no_grad()
def time_torch(model: MomForCausalLM, batch: int, prompt: int, steps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    cache = model.new_cache(batch)
    logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    step = CudaGraphStep(model, cache)

    def next_ids(logits: torch.Tensor) -> torch.Tensor:  # on the host, as for onnxruntime
        return torch.from_numpy(logits[:, -1].float().cpu().numpy().argmax(-1)[:, None]).cuda()

    tok = next_ids(logits)
    for _ in range(WARMUP):
        tok = next_ids(step(tok))
    start = time.perf_counter()
    for _ in range(steps):
        tok = next_ids(step(tok))
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=None, help="export folder (default /tmp/ort-CONFIG-DTYPE; exported if "
                   "missing)")
    p.add_argument("--config", default="340m")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    args = p.parse_args()
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"ort_decode.py needs onnxruntime's CUDA provider (have {ort.get_available_providers()})")
    args.folder = args.folder or f"/tmp/ort-{args.config}-{args.dtype}"
    export(args.folder, args.config, args.dtype, seed=0)
    backends = {}
    for how, options in (("", {}), (", CUDA graphs", {"enable_cuda_graph": "1"})):
        try:
            backend = OnnxBackend(args.folder, providers=[("CUDAExecutionProvider", options)])
        except Exception as e:  # noqa: BLE001 (onnxruntime's errors share no public type)
            print(f"onnxruntime{how}: the session fails: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        if backend.device[0] != "cuda":  # onnxruntime fell back to the CPU provider, saying little
            print(f"onnxruntime{how}: the CUDA provider did not start (the session runs on the CPU): "
                  "no row", flush=True)
            continue
        backends[how] = backend
    torch.manual_seed(0)
    model = MomForCausalLM(MomConfig.preset(args.config)).to("cuda", torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name()}, commit {tree_commit()}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}; "
          f"{args.config}, prompt {args.prompt}, {args.steps} timed greedy steps", flush=True)
    rows = []
    for batch in args.batches:
        rows.append((batch, "torch, eager step from a CUDA graph (bf16)",
                     time_torch(model, batch, args.prompt, args.steps)))
        torch.cuda.empty_cache()  # onnxruntime's arena grows into what torch gives back
        for how, backend in backends.items():
            rows.append((batch, f"onnxruntime CUDA provider ({args.dtype}, I/O binding{how})",
                         time_ort(backend, batch, args.prompt, args.steps, model.config.vocab_size)))
        for row in rows[-1 - len(backends):]:
            print(f"  batch {row[0]} {row[1]}: {row[2]:.3f} ms/step", flush=True)
    print("\n| batch | implementation | ms/step (a token for each sequence) |\n| --- | --- | --- |")
    for batch, name, ms in rows:
        print(f"| {batch} | {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
