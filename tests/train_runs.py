"""Helpers shared by the training tests (run the command in-process or as a subprocess, read the
losses a run recorded) and, for interruptions, by the export CLI's tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from mom_compile.train import main
from mom_compile.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a model and task small enough for a CPU test: the tiny config on 32-token MQAR sequences
TINY_MQAR = ["--config", "tiny", "--task", "mqar", "--seq-len", "32", "--mqar-pairs", "4",
             "--no-compile", "--log-every", "1", "--eval-samples", "8"]


def train(*args) -> int:
    return main([str(a) for a in args])


def env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def default_signals() -> None:
    """A Popen preexec_fn: the child starts with SIGINT and SIGTERM at their defaults and unblocked,
    whatever this process's threads and libraries have set (a child inherits blocked and ignored
    signals), so that a test's signal reaches the command's own handlers."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def wrapped_interrupt() -> RuntimeError:
    """An interruption as a compiler reports it: its own error, raised from the KeyboardInterrupt."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("C++ compile failed") from interrupt
    except RuntimeError as error:
        return error


def command(*args, processes: int = 1) -> list[str]:
    """`python -m mom_compile.train ARGS`, or under torchrun with `processes` processes."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return launcher + ["-m", "mom_compile.train", *map(str, args)]


def train_subprocess(*args, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, processes=processes), capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "loss" in r}
