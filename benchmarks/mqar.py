"""MQAR recall benchmark: what several memories buy at equal width (issue 14).

Three models of width d=128 with 2 layers (2 heads of 64, MLP ratio 4, vocabulary 8192, the
output head tied to the embeddings as in Zoology's models):
  gdn   one gated-delta memory (num_memories=1, topk=1, no shared memory): the Gated DeltaNet baseline
  mom4  MoM: 4 memories, top-2, plus the shared memory
  mom8  MoM: 8 memories, top-2, plus the shared memory
on multi-query associative recall (Zoology's MQAR, mom_compile/train/mqar.py) at sequence lengths
256 and 512. Each (model, length, seed) is one `python -m mom_compile.train` run for a fixed budget
of steps on a mix of 16 .. T/4 key-value pairs per sequence, then scored on held-out sequences for
each pair count (accuracy on the asked keys' values). The runs are independent processes, several
per GPU (the models are tiny), spread over --gpus; each writes OUT/runs/<model>-T<len>-seed<s>/
(log.txt, metrics.jsonl, commit.txt and device.txt: the commit and the card it trained with, the
final model). At the end: a
table (printed, OUT/mqar.md for benchmarks/RESULTS.md), OUT/results.json and OUT/mqar.png
(accuracy vs pairs, one line per model).

    python benchmarks/mqar.py --out runs/mqar                 # every visible GPU, the defaults
    python benchmarks/mqar.py --out runs/mqar --gpus 0 --budget-steps 800 --seeds 2
    python benchmarks/mqar.py --out runs/mqar --report        # table and plot again, no training
    python benchmarks/mqar.py --device cpu --budget-steps 2 --seq-lens 64 --vocab 64 --batch-size 2 ...

Finished runs are kept: running the command again trains only what is missing (an unfinished run
is started afresh). Without matplotlib (the GPU image may lack it) the PNG is skipped; run --report
where it is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tree_commit import tree_commit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mom_compile.cli_args import int_at_least  # noqa: E402
from mom_compile.train.metrics import read_metrics  # noqa: E402
from mom_compile.train.mqar import check_mqar  # noqa: E402

MODELS = {  # name: (label, MomConfig overrides)
    "gdn": ("GDN (1 memory)", dict(num_memories=1, topk=1, shared_mem=False)),
    "mom4": ("MoM 4 memories, top-2 + shared", dict(num_memories=4, topk=2, shared_mem=True)),
    "mom8": ("MoM 8 memories, top-2 + shared", dict(num_memories=8, topk=2, shared_mem=True)),
}
# Output heads tied to the embeddings, as in Zoology's models.
WIDTH = dict(hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=64, hidden_ratio=4,
             tie_word_embeddings=True)


@dataclass(frozen=True)
class Job:
    model: str
    seq_len: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-T{self.seq_len}-seed{self.seed}"


def pair_counts(seq_len: int, pairs: list[int]) -> list[int]:
    """The pair counts that fit a sequence (the task's own rule; the vocabulary is never the limit
    here)."""
    return [p for p in pairs if check_mqar(1 << 30, seq_len, [p]) is None]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mqar", help="output folder (default runs/mqar)")
    p.add_argument("--budget-steps", type=int_at_least(1), default=1500,
                   help="optimizer steps per run (default 1500)")
    p.add_argument("--seeds", type=int_at_least(1), default=2, help="seeds per (model, length) (default 2)")
    p.add_argument("--gpus", help="comma-separated GPU indices (default: every visible GPU)")
    p.add_argument("--jobs-per-gpu", type=int_at_least(1), default=6,
                   help="runs at once on each GPU, or in all on --device cpu (default 6)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--seq-lens", default="256,512", help="sequence lengths (default 256,512)")
    p.add_argument("--pairs", default="16,32,64,128",
                   help="pair counts, each used where 4 x pairs <= length (default 16,32,64,128)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="sequences per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--vocab", type=int_at_least(4), default=8192,
                   help="vocabulary of models and task (default 8192)")
    p.add_argument("--eval-samples", type=int_at_least(1), default=512,
                   help="held-out sequences per pair count (default 512)")
    p.add_argument("--no-compile", action="store_true", help="train eagerly (no torch.compile warm-up)")
    p.add_argument("--report", action="store_true", help="no training: table and plot from finished runs")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {unknown}, expected some of {list(MODELS)}")
    try:
        args.seq_lens = [int(t) for t in args.seq_lens.split(",")]
        args.pairs = [int(n) for n in args.pairs.split(",")]
    except ValueError as e:
        p.error(f"--seq-lens, --pairs: expected comma-separated integers ({e})")
    for t in args.seq_lens:
        if not pair_counts(t, args.pairs):
            p.error(f"--seq-lens: {t} fits none of --pairs {args.pairs} (needs 4 x pairs <= length)")
    return args


def write_configs(args, out: Path) -> dict[str, Path]:
    from mom_compile import MomConfig

    paths = {}
    for name in args.models:
        config = MomConfig(vocab_size=args.vocab, **WIDTH, **MODELS[name][1])
        paths[name] = out / "configs" / f"{name}.json"
        config.save_pretrained(paths[name].parent)
        os.replace(paths[name].parent / "config.json", paths[name])
    return paths


def train_command(args, job: Job, config: Path, run: Path, device: str) -> list[str]:
    pairs = ",".join(map(str, pair_counts(job.seq_len, args.pairs)))
    log_every = max(1, min(100, args.budget_steps // 10))
    command = [sys.executable, "-m", "mom_compile.train", "--config-json", config, "--task", "mqar",
               "--seq-len", job.seq_len, "--mqar-pairs", pairs, "--mqar-vocab", args.vocab,
               "--steps", args.budget_steps, "--batch-size", args.batch_size, "--lr", args.lr,
               "--seed", job.seed, "--eval-samples", args.eval_samples, "--save-every", 0,
               "--log-every", log_every, "--device", device, "--out", run]
    return [str(c) for c in command] + (["--no-compile"] if args.no_compile else [])


# what a run trained with, beside its model, length and seed (its folder's name)
SETTINGS = ("budget_steps", "batch_size", "lr", "vocab", "eval_samples", "no_compile", "pairs")


def settings(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


def finished(run: Path, args) -> dict | None:
    """The held-out evaluation of a run completed with these settings (made once, at its end),
    else None; only metrics.jsonl and settings.json are read, so --report works on a copy of the
    runs without their model files. A run of other settings is not these results."""
    recorded = run / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != settings(args):
        return None
    evals = [r for r in read_metrics(str(run / "metrics.jsonl")) if "eval_accuracy" in r]
    return evals[-1] if evals else None


def run_all(args, jobs: list[Job], configs: dict[str, Path], out: Path) -> list[Job]:
    """Train every job not finished yet; returns the jobs that failed."""
    import shutil

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = ([g for g in args.gpus.split(",")] if args.gpus else
            [str(i) for i in range(torch.cuda.device_count())]) if device == "cuda" else [None]
    if device == "cuda" and not gpus:
        raise SystemExit("error: --device cuda but no GPU is visible")
    slots = len(gpus) * args.jobs_per_gpu
    threads = max(1, (os.cpu_count() or 1) // slots)
    todo = [job for job in jobs if finished(out / "runs" / job.name, args) is None]
    commit = tree_commit()  # each run records the code it trained with (runs resume across trees)
    where = f"GPUs {','.join(gpus)}" if device == "cuda" else "the CPU"
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished; training {len(todo)} on "
          f"{where} ({slots} at once, {args.budget_steps} steps, "
          f"batch {args.batch_size}, {'eager' if args.no_compile else 'torch.compile'})", flush=True)
    running: dict[Job, tuple[subprocess.Popen, str | None]] = {}
    failed, start, last_report = [], time.monotonic(), 0.0
    while todo or running:
        for job, (process, _) in list(running.items()):
            if process.poll() is not None:
                del running[job]
                if process.returncode != 0:
                    failed.append(job)
                    tail = (out / "runs" / job.name / "log.txt").read_text().strip().splitlines()[-3:]
                    print(f"  {job.name} FAILED (exit {process.returncode}): {' | '.join(tail)}", flush=True)
        while todo and len(running) < slots:
            job = todo.pop(0)
            load = {g: sum(1 for _, gg in running.values() if gg == g) for g in gpus}
            gpu = min(gpus, key=lambda g: load[g])
            run = out / "runs" / job.name
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            (run / "commit.txt").write_text(commit + "\n")
            (run / "device.txt").write_text((torch.cuda.get_device_name(int(gpu)) if gpu else "CPU") + "\n")
            (run / "settings.json").write_text(json.dumps(settings(args)) + "\n")
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_COMPILE_THREADS=str(threads))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            with open(run / "log.txt", "w") as log:
                process = subprocess.Popen(train_command(args, job, configs[job.model], run, device),
                                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running[job] = (process, gpu)
        now = time.monotonic()
        if now - last_report >= 15 or (not todo and not running):
            last_report = now
            steps = [max([0] + [r.get("step", 0) for r in read_metrics(str(out / "runs" / j.name /
                                                                               "metrics.jsonl"))])
                     for j in running]
            shown = f", running at steps {min(steps)}..{max(steps)} of {args.budget_steps}" if steps else ""
            print(f"[{now - start:5.0f}s] {len(jobs) - len(todo) - len(running) - len(failed)} done, "
                  f"{len(running)} running, {len(todo)} waiting{shown}", flush=True)
        time.sleep(0.5)
    return failed


def collect(args, jobs: list[Job], out: Path) -> list[dict]:
    rows = []
    for job in jobs:
        run = out / "runs" / job.name
        final = finished(run, args)
        if final is None:
            continue
        train = [r for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r]
        commit, device = (f.read_text().strip() if f.exists() else "not recorded"
                          for f in (run / "commit.txt", run / "device.txt"))
        rows.append(dict(model=job.model, seq_len=job.seq_len, seed=job.seed, commit=commit, device=device,
                         steps=train[-1]["step"], final_loss=train[-1]["loss"],
                         train_seconds=train[-1]["elapsed_s"], accuracy=final["eval_accuracy"],
                         accuracy_by_pairs=final["eval_accuracy_by_pairs"]))
    return rows


def summarize(args, rows: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines of the table, and {(model, seq_len, pairs): (mean, std, n)}."""
    cells = {}
    for model in args.models:
        for seq_len in args.seq_lens:
            for pairs in pair_counts(seq_len, args.pairs):
                values = [r["accuracy_by_pairs"][str(pairs)] for r in rows if r["model"] == model
                          and r["seq_len"] == seq_len and str(pairs) in r["accuracy_by_pairs"]]
                if values:
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells[(model, seq_len, pairs)] = (statistics.mean(values), std, len(values))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"MQAR held-out accuracy on the asked keys (mean ± std over {len(seeds)} seed(s)); "
             f"d=128, 2 layers, vocab {args.vocab}; {args.budget_steps} steps x {args.batch_size} "
             f"sequences, lr {args.lr:g}, each length trained on a mix of its pair counts; trained at "
             f"commit {', '.join(sorted({r['commit'] for r in rows})) or '-'} on "
             f"{', '.join(sorted({r['device'] for r in rows})) or '-'}",
             "", "| length | pairs | " + " | ".join(MODELS[m][0] for m in args.models) + " |",
             "| --- | --- | " + " | ".join("---" for _ in args.models) + " |"]
    for seq_len in args.seq_lens:
        for pairs in pair_counts(seq_len, args.pairs):
            shown = []
            for model in args.models:
                cell = cells.get((model, seq_len, pairs))
                shown.append("-" if cell is None else f"{cell[0]:.3f} ± {cell[1]:.3f}")
            lines.append(f"| {seq_len} | {pairs} | " + " | ".join(shown) + " |")
    seconds = [r["train_seconds"] for r in rows]
    if seconds:
        lines += ["", f"{len(rows)} runs; training wall time per run {min(seconds):.0f}-{max(seconds):.0f} s "
                      "(runs at once shared the devices)"]
    return lines, cells


def plot(args, cells: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.seq_lens), figsize=(5 * len(args.seq_lens), 4), squeeze=False)
    for ax, seq_len in zip(axes[0], args.seq_lens):
        for model in args.models:
            points = [(p, *cells[(model, seq_len, p)][:2]) for p in pair_counts(seq_len, args.pairs)
                      if (model, seq_len, p) in cells]
            if points:
                x, mean, std = zip(*points)
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=MODELS[model][0])
        ax.set_xscale("log", base=2)
        ticks = pair_counts(seq_len, args.pairs)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR, sequence length {seq_len}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=120)
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [Job(model, seq_len, seed) for seed in range(args.seeds) for seq_len in args.seq_lens
            for model in args.models]  # seed-major: the first runs cover every model and length
    failed = []
    if not args.report:
        failed = run_all(args, jobs, write_configs(args, out), out)
    rows = collect(args, jobs, out)
    lines, cells = summarize(args, rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "mqar.md").write_text("\n".join(lines) + "\n")
    drew = plot(args, cells, out / "mqar.png")
    print("\n".join(lines))
    png = f", {out / 'mqar.png'}" if drew else " (no matplotlib: no PNG; run --report where it is installed)"
    print(f"\nwrote {out / 'mqar.md'}, {out / 'results.json'}{png}")
    if len(rows) < len(jobs):
        print(f"{len(jobs) - len(rows)} of {len(jobs)} runs missing or failed: "
              + ", ".join(j.name for j in failed or jobs
                          if finished(out / "runs" / j.name, args) is None))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
