"""The user's whole journey on a CPU: train the tiny model on MQAR until the loss has clearly
fallen, resume from a checkpoint with the same losses bit for bit, export the trained model to ONNX
and generate the same greedy tokens with onnxruntime as with PyTorch."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from mom_compile import MomForCausalLM
from mom_compile.train.metrics import read_metrics

from train_runs import ROOT, TINY_MQAR, env, losses, train

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
# 64 ids: keys 1-31, values 32-63; the loss starts near ln(256) and falls by more than a nat once
# the model puts its mass on the 32 value ids after a key
RUN = [*TINY_MQAR, "--mqar-vocab", "64", "--batch-size", "8", "--steps", STEPS, "--lr", "1e-2",
       "--save-every", "10"]


def test_train_resume_export_generate(tmp_path):
    run = tmp_path / "run"
    assert train(*RUN, "--out", run, "--plot") == 0
    full = losses(run)
    assert sorted(full) == list(range(1, STEPS + 1))
    first = np.mean([full[s] for s in range(1, 6)])
    last = np.mean([full[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < first - 1.0, (first, last)
    evals = [r for r in read_metrics(str(run / "metrics.jsonl")) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [STEPS] and set(evals[0]["eval_accuracy_by_pairs"]) == {"4"}
    for png in ("loss.png", "accuracy.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # continue from the middle checkpoint in another folder: the same losses and weights, bit for bit
    resumed = tmp_path / "resumed"
    assert train("--resume", run / "checkpoints" / "step-000010", "--out", resumed) == 0
    assert losses(resumed) == {s: full[s] for s in range(11, STEPS + 1)}
    assert (resumed / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()

    # the final model folder is the last checkpoint's weights, in the reference layout
    model = MomForCausalLM.from_pretrained(run).eval()
    stored = {name: torch.empty_like(p) for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is intended
        warnings.simplefilter("ignore")
        dcp.load({"model": stored}, checkpoint_id=str(run / "checkpoints" / f"step-{STEPS:06d}"))
    for name, p in model.named_parameters():
        assert torch.equal(p, stored[name]), name

    result = subprocess.run([sys.executable, "-m", "mom_compile.export", "--onnx", str(run / "onnx"),
                             "--checkpoint", str(run)], capture_output=True, text=True, timeout=300,
                            env=env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    from mom_compile.export.runtime import OnnxGenerator

    prompt = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, max_new_tokens=12)
    got = OnnxGenerator(run / "onnx").generate(prompt.numpy(), max_new_tokens=12)
    np.testing.assert_array_equal(got, expected.numpy())
