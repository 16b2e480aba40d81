"""The Triton kernels' default configurations fit an H100/H200. `benchmarks/kernel_resources.py`
compiles every launch of the scan and the conv for sm_90 on this machine (no GPU needed); a kernel
asking for more shared memory than one block may have would fail on the GPU with OutOfResources,
a failure the CPU interpreter cannot show. Checked at the widest heads the kernels run at
(K = 256, V = 512), in every dtype, and in bf16 with the scan's configuration for few programs."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
KERNELS = 14  # 10 of the scan (chunk table and tail zeroing too), 4 of the conv (its row table too)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
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


def test_without_triton_says_what_to_install():
    # the script run as `python benchmarks/kernel_resources.py` where triton cannot be imported
    hide = f"import sys, runpy; sys.modules['triton'] = None; sys.argv = [{str(SCRIPT)!r}]; " \
           f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        'kernel_resources.py compiles the Triton kernels: pip install "mom-compile[triton]" first']
