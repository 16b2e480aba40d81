"""What a run reports: one JSON record per line in OUT/metrics.jsonl, and a progress display (a
tqdm bar on a terminal when tqdm is installed, else one plain line per log step)."""
from __future__ import annotations

import json
import os
import sys
import time


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file; a last line cut short by a killed run is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsFile:
    """Appends records to a jsonl file. On resume from step N, records after step N (written by
    the run after its last checkpoint) are dropped first, so every step appears once; resuming
    a run's last step (`final`: to write its final model) drops the evaluation that follows it."""

    def __init__(self, path: str, resume_step: int | None, final: bool = False) -> None:
        self.path = path
        if resume_step is not None:
            kept = [r for r in read_metrics(path) if r.get("step", 0) < resume_step or
                    r.get("step", 0) == resume_step and not (final and "eval_accuracy" in r)]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(path + ".tmp", path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Shows step, loss, tokens/s and the time left; `enabled=False` (processes other than 0)
    shows nothing."""

    def __init__(self, start_step: int, total_steps: int, enabled: bool) -> None:
        self.total, self.enabled = total_steps, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.last_step = start_step

    def update(self, step: int, loss: float, tokens_per_s: float, seconds_per_step: float,
               accuracy: float | None = None) -> None:
        if not self.enabled:
            return
        shown = {"loss": f"{loss:.4f}"}
        if accuracy is not None:
            shown["acc"] = f"{accuracy:.3f}"
        shown["tok/s"] = format_count(tokens_per_s)
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix(shown, refresh=True)
        else:
            eta = format_duration(seconds_per_step * (self.total - step))
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {fields} eta {eta}", flush=True)
        self.last_step = step

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Tokens per second and seconds per step between two log points."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.perf_counter()

    def measure(self, step: int, tokens_per_step: int) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self.time, 1e-9)
        per_step = elapsed / max(step - self.step, 1)
        self.step, self.time = step, now
        return tokens_per_step / per_step, per_step
