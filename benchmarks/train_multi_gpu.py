"""Multi-GPU training check (issue 14): 2 GPUs under torchrun (FSDP2) against 1 GPU with the same
global batch, on the same data, for the first --steps steps.

Both runs are `python -m mom_compile.train` (bf16 autocast, torch.compile) on MQAR with a model of
the 340m width and --layers layers (d=1024, 4 heads of 256, 4 memories top-2 + shared): the 1-GPU
run takes --batch-size rows x 2 accumulation steps, the 2-GPU run --batch-size rows x 1 x 2 GPUs,
so every step sees the same sequences in the same micro-batches. Printed last: the loss of both at
every 5th step, the largest difference over all steps, and tokens/s of each (median over the steps
after the first 10, which include compilation) with the speed-up.

    python benchmarks/train_multi_gpu.py [--out runs/multi_gpu] [--steps 50] [--layers 4]
        [--seq-len 2048] [--batch-size 8] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig  # noqa: E402
from mom_compile.cli_args import int_at_least  # noqa: E402
from mom_compile.train.metrics import read_metrics  # noqa: E402

WARM_UP_STEPS = 10  # excluded from tokens/s: compilation and autotuning happen there


def train(args, out: Path, gpus: int, config: Path) -> tuple[list[dict], float]:
    """Run one training; returns its step records and its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    launcher = [sys.executable] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    options = ["--config-json", config, "--task", "mqar", "--seq-len", args.seq_len, "--mqar-vocab", 8192,
               "--batch-size", args.batch_size, "--grad-accum", 2 // gpus, "--steps", args.steps,
               "--lr", 3e-4, "--warmup-steps", 5, "--log-every", 1, "--save-every", 0,
               "--eval-samples", args.batch_size * 2, "--out", out]
    options += ["--no-compile"] if args.no_compile else []
    command = launcher + ["-m", "mom_compile.train"] + [str(o) for o in options]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
    print(f"{gpus} GPU(s): {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {args.timeout} s"
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-15:]
        raise SystemExit(f"the {gpus}-GPU run failed ({code}); {out / 'log.txt'} ends:\n"
                         + "\n".join(tail))
    return [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r], seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/multi_gpu")
    p.add_argument("--steps", type=int_at_least(WARM_UP_STEPS + 1), default=50,
                   help=f"optimizer steps, the first {WARM_UP_STEPS} untimed (default 50)")
    p.add_argument("--layers", type=int_at_least(1), default=4)
    p.add_argument("--seq-len", type=int_at_least(1), default=2048)
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="rows per GPU per forward pass (default 8)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--timeout", type=int_at_least(1), default=300,
                   help="seconds allowed per run (default 300)")
    args = p.parse_args()
    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"error: needs 2 GPUs, this machine shows {torch.cuda.device_count()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = MomConfig.preset("340m", num_hidden_layers=args.layers)
    config.save_pretrained(out)
    one, one_s = train(args, out / "gpu1", 1, out / "config.json")
    two, two_s = train(args, out / "gpu2", 2, out / "config.json")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, args.steps + 1))

    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    speed = [statistics.median(r["tokens_per_s"] for r in rows if r["step"] > WARM_UP_STEPS)
             for rows in (one, two)]
    (out / "compare.json").write_text(json.dumps({"one_gpu": one, "two_gpus": two}, indent=1) + "\n")
    tokens = args.batch_size * 2 * args.seq_len
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {tree_commit()}; loss, model "
          f"{config.hidden_size}d x {args.layers} layers, global batch {args.batch_size * 2} x "
          f"{args.seq_len} = {tokens} tokens per step:")
    b = args.batch_size
    print(f"| step | 1 GPU ({b} x 2 accumulation) | 2 GPUs ({b} x 1 x 2) | difference |")
    print("| --- | --- | --- | --- |")
    for a, b in zip(one, two):
        if a["step"] % 5 == 0 or a["step"] == 1:
            print(f"| {a['step']} | {a['loss']:.5f} | {b['loss']:.5f} | {b['loss'] - a['loss']:+.2e} |")
    print(f"\nmax |loss difference| over {args.steps} steps: {diffs[worst]:.2e} at step {one[worst]['step']} "
          f"({diffs[worst] / one[worst]['loss']:.2e} of the loss); mean {statistics.mean(diffs):.2e}")
    print("\n| GPUs | tokens/s (median, steps > 10) | speed-up | wall time incl. start and compile |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 | {speed[0]:,.0f} | 1.00 | {one_s:.0f} s |")
    print(f"| 2 | {speed[1]:,.0f} | {speed[1] / speed[0]:.2f} | {two_s:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
