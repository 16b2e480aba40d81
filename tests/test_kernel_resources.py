"""The Triton kernels' default configurations fit an H100/H200. `benchmarks/kernel_resources.py`
compiles every launch of the scan and the conv for sm_90 on this machine (no GPU needed); a kernel
asking for more shared memory than one block may have would fail on the GPU with OutOfResources,
a failure the CPU interpreter cannot show. Checked at the widest heads the kernels run at
(K = 256, V = 512), in every dtype, and in bf16 with the scan's configuration for few programs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
KERNELS = 14  # 10 of the scan (chunk table and tail zeroing too), 4 of the conv (its row table too)


@pytest.mark.parametrize("dtype, options", [("bf16", []), ("fp32", []), ("fp64", []),
                                            ("bf16", ["--few-programs"])],
                         ids=["bf16", "fp32", "fp64", "bf16-few-programs"])
def test_default_configs_fit_sm90_shared_memory(dtype, options):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dtype", dtype, "--expand-v", "2", *options],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "_kernel" in line]
    assert len(rows) == KERNELS, proc.stdout
    assert not [row for row in rows if "too much" in row], proc.stdout
