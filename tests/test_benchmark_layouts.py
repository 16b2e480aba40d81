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


def test_all_sets_counts_every_memorys_projection_on_every_token(monkeypatch):
    """--all-sets (the layer as built) adds the projections of the 2 unrouted sets of each token:
    2 * d * (HK + HV + 2H) FLOPs a token and set, forward; the other stages are unchanged."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from layer_floor import Shape, layer_stages

    routed, built = layer_stages(Shape(2048, 4)), layer_stages(Shape(2048, 4, all_sets=True))
    d, width, unrouted = 1024, 4 * 256 + 4 * 256 + 2 * 4, 2 * 2048 * 4
    assert built[0].fwd_flops - routed[0].fwd_flops == 2 * d * width * unrouted
    assert "all 5 sets" in built[0].name and "3 of 5 sets" in routed[0].name
    assert [(x.fwd_flops, x.bwd_bytes) for x in built[1:]] == [(x.fwd_flops, x.bwd_bytes) for x in routed[1:]]
    out = subprocess.run([sys.executable, str(SCRIPT), "--ts", "2048", "--all-sets"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "all 5 sets" in out.stdout, out.stderr
