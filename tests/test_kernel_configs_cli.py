"""`benchmarks/kernel_configs.py` takes its configurations after `--layout` too (argparse alone
refuses them there). Without a GPU its command line is parsed and then refused for want of a CUDA
device, so the error it ends on tells whether the arguments parsed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_configs.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs the benchmark")
def test_configs_parse_after_layout():
    proc = subprocess.run([sys.executable, str(SCRIPT), "scan", "--layout", "1", "512", '{"state_bv": 32}'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr, proc.stderr
