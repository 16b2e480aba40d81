"""`python -m mom_compile.export`: exit codes, one-line errors, and a full checkpoint run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mom_compile import MomForCausalLM  # noqa: E402
from mom_compile.graphs import MomConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MOM_EXPORT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mom_compile.export", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_is_for_newcomers():
    result = cli("--help")
    assert result.returncode == 0
    for words in ("--onnx OUT", "--checkpoint", "--config", "--verify", "--plugin", "--pt2",
                  "prefill.onnx", "decode_step.onnx", "model.json", "examples:"):
        assert words in result.stdout


def test_bad_arguments(tmp_path):
    assert_one_line_error(cli(), 2, "--onnx")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--config", "huge"), 2, "--config")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--dtype", "int8"), 2, "--dtype")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--opset", "9"), 1, "--opset")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--checkpoint", "x", "--config", "tiny"), 2,
                          "not allowed with")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(cli("--onnx", str(blocker)), 1, "--onnx", "not a folder")
    assert_one_line_error(cli("--onnx", str(blocker / "below")), 1, "--onnx", "cannot write")


def test_unreadable_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    assert_one_line_error(cli("--onnx", out, "--checkpoint", str(tmp_path / "missing")), 1,
                          "--checkpoint", "not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("--onnx", out, "--checkpoint", str(empty)), 1, "--checkpoint", "config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert_one_line_error(cli("--onnx", out, "--checkpoint", str(broken)), 1, "--checkpoint", "JSON")
    MomForCausalLM(MomConfig.preset("tiny")).config.save_pretrained(broken)  # config, but no weights
    assert_one_line_error(cli("--onnx", out, "--checkpoint", str(broken)), 1, "--checkpoint",
                          "model.safetensors")


def test_checkpoint_export_verify_and_pt2(tmp_path):
    torch.manual_seed(2)
    model = MomForCausalLM(MomConfig.preset("tiny")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    result = cli("--onnx", str(out), "--checkpoint", str(tmp_path / "ckpt"), "--verify", "--pt2")
    assert result.returncode == 0, result.stderr
    assert "verify: OK" in result.stdout
    assert "present.1.recurrent" in result.stdout and "max rel" in result.stdout
    for name in ("prefill.onnx", "decode_step.onnx", "model.json", "prefill.pt2", "decode_step.pt2"):
        assert (out / name).is_file()
    # the pt2 programs load in a fresh process after `import mom_compile` and match the model
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch, mom_compile\n"
        f"ep = torch.export.load({str(out / 'prefill.pt2')!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "torch.save(ep.module()(ids, torch.ones_like(ids))[0], sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.pt")], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, atol=1e-5, rtol=1e-5)
