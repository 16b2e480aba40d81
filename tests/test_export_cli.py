"""`python -m mom_compile.export`: exit codes, one-line errors, no half-written output folder, the
files of a re-export, no exporter noise, and a full checkpoint run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mom_compile import MomForCausalLM  # noqa: E402
from mom_compile.graphs import MomConfig  # noqa: E402

from train_runs import default_signals, wrapped_interrupt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 180, path_first: str | None = None) -> subprocess.CompletedProcess:
    """The command in a subprocess; path_first: a folder put before everything on its PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (path_first, ROOT, os.environ.get("PYTHONPATH")) if p))
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
                  "prefill.onnx", "decode_step.onnx", "weights.onnx.data", "model.json", "examples:",
                  "leaves OUT as it was", "MoM paper's names", "545M"):
        assert words in " ".join(result.stdout.split())


def test_bad_arguments(tmp_path):
    assert_one_line_error(cli(), 2, "--onnx")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--config", "huge"), 2, "--config")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--dtype", "int8"), 2, "--dtype")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--opset", "9"), 1, "--opset")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--checkpoint", "x", "--config", "tiny"), 2,
                          "not allowed with")
    # an empty path would export into the working folder, or a random model
    assert_one_line_error(cli("--onnx", ""), 2, "--onnx", "empty")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--checkpoint", " "), 2, "--checkpoint", "empty")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--seed", str(2**64)), 2, "--seed")
    assert os.listdir(tmp_path) == []


def test_terminated_export_leaves_nothing(tmp_path):
    """SIGTERM (a scheduler's stop) cleans up like Ctrl-C: no OUT, no hidden partial folder."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "mom_compile.export", "--onnx", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, preexec_fn=default_signals)
    deadline = time.monotonic() + 120
    while not any(n.endswith(".partial") for n in os.listdir(tmp_path)) and process.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    # exit status 1, though now and then the process ends by SIGINT after the same message (its
    # cause is not found yet); what this test holds to is the message and the cleanup
    assert process.returncode in (1, -signal.SIGINT) and "error: interrupted" in err, err
    assert os.listdir(tmp_path) == []


def test_a_killed_exports_staging_folder_is_removed_by_the_next(tmp_path):
    """SIGKILL (the OOM killer) leaves the hidden staging folder behind, as nothing runs to clean
    up: the next export to OUT removes it (its lock file no longer locked), and leaves a running
    export's (locked), a folder without a lock file and another OUT's."""
    import fcntl

    from mom_compile.export import __main__ as export_main
    out = tmp_path / "out"
    out.mkdir()
    killed = [tmp_path / ".out.k2j_x.partial", out / ".out.a1b.partial"]
    running, unlocked, other = tmp_path / ".out.zz9.partial", tmp_path / ".out.q.partial", \
        tmp_path / ".other.q.partial"
    for folder in [*killed, running, unlocked, other]:
        folder.mkdir()
        (folder / "prefill.onnx").write_text("half")
        if folder != unlocked:
            (folder / export_main._LOCK).write_text("")
    held = os.open(running / export_main._LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the running export's process holds it
    try:
        staging = export_main._Staging(str(out), "--onnx")
    finally:
        os.close(held)
    assert [f.exists() for f in [*killed, running, unlocked, other]] == [False, False, True, True, True]
    export_main._Staging(str(out), "--onnx").discard()  # another export while this one stages
    assert os.path.isdir(staging.path)
    staging.publish()  # its lock is gone before its files move: OUT holds no lock file
    assert sorted(os.listdir(out)) == []


def test_an_interrupt_lost_in_a_callback_still_stops_the_command():
    """SIGTERM delivered while Python runs a weakref callback (or an import lock's, as a terminated
    export once met): its KeyboardInterrupt is printed as "Exception ignored" and the code carries
    on, so check_interrupted raises it again, and so does the end of the block."""
    import weakref

    from mom_compile.interrupts import check_interrupted, sigterm_as_interrupt

    class Thing:
        pass

    def terminate_inside(_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler's KeyboardInterrupt is raised here, in the callback
    carried_on = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            thing = Thing()
            ref = weakref.ref(thing, terminate_inside)
            del thing  # runs the callback; Python swallows what it raises
            carried_on.append(ref() is None)
            check_interrupted()
            carried_on.append("past the check")
    assert carried_on == [True]
    with pytest.raises(KeyboardInterrupt):  # without a check, the block's end raises it
        with sigterm_as_interrupt():
            ref = weakref.ref(Thing(), terminate_inside)
    check_interrupted()  # a new block starts clean: nothing pending after the last one


def test_ctrl_c_while_replacing_an_export_waits_for_every_file(tmp_path, monkeypatch):
    """A signal while an export replaces an earlier one in OUT is held back until all of it is in:
    a swap stopped halfway would leave one model's graphs beside the other's model.json."""
    from mom_compile.export import __main__ as export_main
    names = ("model.json", "prefill.onnx", "decode_step.onnx")
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text("old")
    staging = export_main._Staging(str(out), "--onnx")
    for name in names:
        with open(os.path.join(staging.path, name), "w") as f:
            f.write("new")
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        staging.publish()
    assert {name: (out / name).read_text() for name in names} == dict.fromkeys(names, "new")
    assert os.listdir(tmp_path) == ["out"]


def test_an_interrupt_wrapped_by_a_compiler_is_reported_as_one(monkeypatch, capsys):
    """Ctrl-C during the AOTInductor or TensorRT builds can reach the CLI inside the compiler's own
    error: it is an interruption, not a failed build; any other error is still a failed build."""
    from mom_compile.export import __main__ as export_main
    from mom_compile.export import aoti

    def build(*args, **kwargs):
        raise wrapped_interrupt()
    monkeypatch.setattr(aoti, "build_packages", build)
    with pytest.raises(RuntimeError) as raised:
        export_main._build_aoti({}, "out", print)
    assert isinstance(raised.value.__cause__, KeyboardInterrupt)

    def run(args):
        export_main._build_aoti({}, "out", lambda _: None)
    monkeypatch.setattr(export_main, "run", run)
    monkeypatch.delenv("MOM_EXPORT_DEBUG", raising=False)
    assert export_main.main(["--onnx", "out"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"

    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile failed")
    monkeypatch.setattr(aoti, "build_packages", fail)
    assert export_main.main(["--onnx", "out"]) == 1
    err = capsys.readouterr().err
    assert "error: --aoti: AOTInductor build failed: RuntimeError: C++ compile failed" in err, err


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
        ref = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, atol=1e-5, rtol=1e-5)


def assert_no_temporary_folder(parent, out_name: str) -> None:
    for folder in (parent, parent / out_name):  # beside OUT, or inside it when it existed
        names = os.listdir(folder) if os.path.isdir(folder) else []
        assert not [name for name in names if name.startswith(f".{out_name}.")]


def test_reexport_into_a_folder_on_another_filesystem(tmp_path, monkeypatch):
    """OUT a mount point (or a link to another disk): a file moves into it only from its own
    filesystem. Staged beside OUT, the export failed at the end with EXDEV after removing the
    earlier export's model.json; staged inside OUT it replaces the earlier export."""
    import errno

    from mom_compile.export import __main__ as export_main
    from mom_compile.export.runtime import OnnxGenerator
    out = tmp_path / "out"
    assert export_main.main(["--onnx", str(out)]) == 0
    real_replace, real_rename = os.replace, os.rename

    def same_filesystem_only(move):
        def moved(src, dst):
            inside = lambda p: os.path.abspath(p).startswith(str(out) + os.sep)  # noqa: E731
            if inside(dst) != inside(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link", src)
            return move(src, dst)
        return moved
    monkeypatch.setattr(os, "replace", same_filesystem_only(real_replace))
    monkeypatch.setattr(os, "rename", same_filesystem_only(real_rename))
    assert export_main.main(["--onnx", str(out), "--seed", "1"]) == 0
    monkeypatch.undo()
    OnnxGenerator(str(out))  # model.json and its graphs are there
    assert_no_temporary_folder(tmp_path, "out")


def test_damaged_checkpoint_is_named_and_nothing_is_left(tmp_path):
    torch.manual_seed(2)
    MomForCausalLM(MomConfig.preset("tiny")).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    result = cli("--onnx", str(tmp_path / "new" / "out"), "--checkpoint", str(tmp_path / "ckpt"))
    assert_one_line_error(result, 1, "--checkpoint", f"{weights}: damaged safetensors file")
    assert not (tmp_path / "new").exists()  # no OUT, nor the parent folder made for it

    keep = tmp_path / "keep"  # an existing OUT is left as it was
    keep.mkdir()
    (keep / "prefill.onnx").write_text("an earlier export")
    assert_one_line_error(cli("--onnx", str(keep), "--checkpoint", str(tmp_path / "ckpt")), 1, "damaged")
    assert os.listdir(keep) == ["prefill.onnx"] and (keep / "prefill.onnx").read_text() == "an earlier export"
    assert_no_temporary_folder(tmp_path, "keep")


def test_without_torch_the_error_names_torch_first(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    result = cli("--onnx", str(tmp_path / "out"), path_first=str(shim))
    assert_one_line_error(result, 1, "missing package 'torch'")
    assert not (tmp_path / "out").exists()


def test_reexport_at_opset_27_is_quiet_and_replaces_the_earlier_files(tmp_path):
    """No exporter noise (onnxscript's opset-converter warnings); in an existing OUT the files of
    an earlier export are replaced or removed, others stay; model.json lists the files."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("notes.txt", "mine"), ("prefill.onnx.data", "stale"), ("prefill.onnx", "old")):
        (out / name).write_text(text)
    result = cli("--onnx", str(out), "--opset", "27")
    assert result.returncode == 0, result.stderr
    assert all(line.startswith("warning: --opset") for line in result.stderr.splitlines()), result.stderr
    manifest = json.loads((out / "model.json").read_text())
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "model.json", *manifest["files"]])
    assert (out / "notes.txt").read_text() == "mine"
    assert manifest["files"] == {name: (out / name).stat().st_size for name in manifest["files"]}
    assert set(manifest["files"]) == {"prefill.onnx", "decode_step.onnx"}  # tiny: weights inside
    assert "prefill.onnx (" in result.stdout and str(out) in result.stdout
    assert_no_temporary_folder(tmp_path, "out")


def test_opset_beyond_onnxruntime(monkeypatch, capsys):
    """A warning (the graphs may run elsewhere), or an error with --verify; the probe itself finds
    an opset the installed onnxruntime loads."""
    import onnx
    import onnxruntime

    from mom_compile.export import __main__ as main

    newest = onnx.defs.onnx_opset_version()
    runnable = main.onnxruntime_max_opset(newest)
    assert main.MIN_OPSET <= runnable <= newest
    monkeypatch.setattr(main, "onnxruntime_max_opset", lambda newest: main.MIN_OPSET)
    args = main.build_parser().parse_args(["--onnx", "x", "--opset", str(main.MIN_OPSET + 1)])
    main._check_args(args)
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: --opset {main.MIN_OPSET + 1}: the installed onnxruntime "
                              f"{onnxruntime.__version__} runs opsets up to {main.MIN_OPSET}")
    args.verify = True
    with pytest.raises(main._Failure, match=f"--opset {main.MIN_OPSET + 1} --verify"):
        main._check_args(args)


def test_failed_verification_leaves_the_earlier_export(tmp_path, monkeypatch, capsys):
    """Graphs that do not match their model (here the model changes after the export) fail
    --verify with exit status 3, and OUT keeps the export it held. The seed is the largest torch
    takes: verify's inputs come from the next one, which wraps around instead of overflowing."""
    from mom_compile.export import __main__ as export_main
    out = tmp_path / "out"
    assert export_main.main(["--onnx", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real = export_main._export

    def export_then_change_the_model(*args):
        paths, packages, model, manifest = real(*args)
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        return paths, packages, model, manifest
    monkeypatch.setattr(export_main, "_export", export_then_change_the_model)
    code = export_main.main(["--onnx", str(out), "--verify", "--seed", str(2**64 - 1)])
    assert code == export_main.EXIT_MISMATCH
    printed = capsys.readouterr().out
    assert "verify: FAILED" in printed and "left as it was" in printed, printed
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert_no_temporary_folder(tmp_path, "out")

