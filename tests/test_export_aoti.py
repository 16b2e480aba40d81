"""AOTInductor packages of the tiny model (`--aoti`): built here, run in a fresh process.

SLOW: the build compiles C++ for both graphs, about 50 s of this file's ~60 s on 2 cores with a
cold Inductor cache. The fresh process proves the packages need nothing of the building
process but `import mom_compile` (for the `mom` ops they call), and that without it loading fails.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mom_compile import MomForCausalLM
from mom_compile.export.aoti import build_packages, compiler
from mom_compile.export.onnx_export import export_programs
from mom_compile.graphs import MomConfig

needs_compiler = pytest.mark.skipif(compiler() is None, reason="AOTInductor needs a C++ compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
STEPS = 3

# Runs in the fresh process: a load before `import mom_compile` (which must fail), then every
# prefill case and STEPS decode steps from the last prefill's state, each step fed the previous
# step's present states.
CHILD = """
import sys, torch
folder, cases_path, out_path = sys.argv[1:]
try:
    torch._inductor.aoti_load_package(folder + "/decode_step.aoti.pt2")
    unregistered = "loaded"
except RuntimeError as e:
    unregistered = str(e)
from mom_compile.export.aoti import Package
cases = torch.load(cases_path)
prefill = Package(folder + "/prefill.aoti.pt2")
step = Package(folder + "/decode_step.aoti.pt2")
outputs = {"prefill": [prefill(ids, mask) for ids, mask in cases["prefill"]], "steps": [],
           "unregistered": unregistered}
states = list(outputs["prefill"][-1][1:])
for ids in cases["steps"]:
    logits, *states = step(ids, states)
    outputs["steps"].append((logits, *states))
torch.save(outputs, out_path)
"""


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    torch.manual_seed(0)
    model = MomForCausalLM(MomConfig.preset("tiny")).eval()
    folder = str(tmp_path_factory.mktemp("aoti"))
    paths = build_packages(export_programs(model), folder, progress=lambda _: None)
    return model, folder, paths


def _cases(model):
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    padded = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(padded)
    mask[0, :4] = 0
    plain = torch.randint(0, vocab, (2, 6), generator=gen)
    steps = [torch.randint(0, vocab, (3, 1), generator=gen) for _ in range(STEPS)]
    return {"prefill": [(plain, torch.ones_like(plain)), (padded, mask)], "steps": steps}


@needs_compiler
def test_packages_match_pytorch_in_a_fresh_process(packages, tmp_path):
    model, folder, paths = packages
    assert sorted(os.path.basename(p) for p in paths.values()) == ["decode_step.aoti.pt2",
                                                                    "prefill.aoti.pt2"]
    cases = _cases(model)
    torch.save(cases, tmp_path / "cases.pt")
    subprocess.run([sys.executable, "-c", CHILD, folder, str(tmp_path / "cases.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=ROOT, env=ENV, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert "mom::" in got["unregistered"]  # the packages call the ops that mom_compile registers
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for (ids, mask), outputs in zip(cases["prefill"], got["prefill"]):
            assert len(outputs) == 1 + 2 * layers
            cache = model.new_cache(ids.shape[0])
            ref = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                        logits_to_keep=1).logits
            torch.testing.assert_close(outputs[0], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(list(outputs[1:]), list(cache.states()), atol=1e-5, rtol=1e-5)
        # the decode steps continue the last (left-padded) prefill, as the model's cache does
        for ids, outputs in zip(cases["steps"], got["steps"]):
            ref = model(ids, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(outputs[0], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(list(outputs[1:]), list(cache.states()), atol=1e-5, rtol=1e-5)


def test_cli_without_a_compiler_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mom_compile.export", "--onnx", str(tmp_path),
                             "--aoti"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env=dict(ENV, CXX=str(tmp_path / "no-such-compiler")))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: --aoti: no C++ compiler")
