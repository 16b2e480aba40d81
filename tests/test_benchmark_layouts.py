"""The layer benchmarks split --tokens into B sequences of each T in --ts: a T that does not divide
it is refused (the rows would hold fewer tokens than the header says). layer_floor.py runs
anywhere, so it stands for the three that share the check (check_gpu.py, train_step.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_floor.py"


def test_a_sequence_length_that_does_not_divide_the_tokens_is_refused():
    bad = subprocess.run([sys.executable, str(SCRIPT), "--ts", "2048", "3000"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--ts: each T must divide --tokens 32768" in bad.stderr, bad.stderr
    good = subprocess.run([sys.executable, str(SCRIPT), "--ts", "2048", "4096", "--tokens", "8192"],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "| 2048 | 4 |" in good.stdout and "| 4096 | 2 |" in good.stdout
