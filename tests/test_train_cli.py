"""`python -m mom_compile.train`: help, one-line errors for bad input, and interrupted runs that
never leave a broken checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from mom_compile import MomConfig, MomForCausalLM
from mom_compile.train import checkpoint as checkpoint_module
from mom_compile.train.checkpoint import resolve_checkpoint
from mom_compile.train.metrics import read_metrics

from train_runs import (
    ROOT,
    TINY_MQAR,
    command,
    default_signals,
    env,
    losses,
    train,
    train_subprocess,
    wrapped_interrupt,
)

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = [*TINY_MQAR, "--batch-size", 2, "--steps", 2]


def one_line_error(capsys, code: int, args, *fragments: str) -> str:
    assert train(*args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_help_is_for_newcomers():
    result = train_subprocess("--help")
    assert result.returncode == 0
    for words in ("--config", "--config-json", "--init-from", "--task", "--data", "--tokenizer", "--seq-len",
                  "--batch-size", "--grad-accum", "--resume", "--no-compile", "--plot", "torchrun",
                  "--nproc-per-node", "model.safetensors", "mom_compile.export", "examples:"):
        assert words in result.stdout, words


def test_bad_arguments_are_one_line(capsys, tmp_path):
    for args, fragment in ((["--seq-len", "1"], "--seq-len"), (["--batch-size", "0"], "--batch-size"),
                           (["--config", "huge"], "--config"), (["--mqar-pairs", "4,x"], "--mqar-pairs"),
                           (["--betas", "1.5", "0.9"], "--betas"), (["--seed", str(2**64)], "--seed"),
                           (["--resume", ""], "--resume"), ([], "--out")):
        with pytest.raises(SystemExit) as exit_info:
            train(*args, *([] if fragment == "--out" else ["--out", tmp_path / "x"]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_bad_input_is_one_line(capsys, tmp_path):
    out = ["--out", tmp_path / "run"]
    one_line_error(capsys, 1, ["--config", "tiny", *out], "--task mqar or --data")
    one_line_error(capsys, 1, ["--data", tmp_path / "missing.txt", *out], "--data", "missing.txt")
    one_line_error(capsys, 1, ["--data", tmp_path, *out], "--data", "is a folder")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(capsys, 1, ["--data", tmp_path / "empty.txt", *out], "--data", "0 tokens")
    (tmp_path / "short.txt").write_text("too short")
    one_line_error(capsys, 1, ["--data", tmp_path / "short.txt", "--seq-len", 64, *out], "--seq-len 64")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    one_line_error(capsys, 1, ["--data", tmp_path / "bad.jsonl", *out], "bad.jsonl:2", "JSON")
    (tmp_path / "field.jsonl").write_text('{"body": "no text field"}\n')
    one_line_error(capsys, 1, ["--data", tmp_path / "field.jsonl", *out], "field.jsonl:1", "--text-field")
    one_line_error(capsys, 1, ["--task", "mqar", "--tokenizer", tmp_path, *out], "--tokenizer")
    one_line_error(capsys, 1, ["--data", tmp_path / "short.txt", "--tokenizer", tmp_path / "nope", *out],
                   "--tokenizer", "not a folder")
    one_line_error(capsys, 1, ["--task", "mqar", "--seq-len", 32, "--mqar-pairs", 16, *out],
                   "--seq-len >= 64")
    one_line_error(capsys, 1, ["--task", "mqar", "--mqar-vocab", 1000, *out], "--mqar-vocab", "256")
    one_line_error(capsys, 1, ["--task", "mqar", "--config-json", tmp_path / "none.json", *out],
                   "--config-json", "none.json")
    (tmp_path / "cfg.json").write_text(json.dumps({"hidden_size": 64, "topk": 9, "num_memories": 4}))
    one_line_error(capsys, 1, ["--task", "mqar", "--config-json", tmp_path / "cfg.json", *out], "topk")
    one_line_error(capsys, 1, ["--resume", tmp_path], "--resume", "no checkpoint")
    (tmp_path / "text.txt").write_text("a b c " * 50)
    one_line_error(capsys, 1, ["--data", tmp_path / "text.txt", "--eval-every", 5, *out], "--eval-every",
                   "only with --task mqar")
    one_line_error(capsys, 1, ["--task", "mqar", "--text-field", "body", *out], "--text-field",
                   "only with --data")
    one_line_error(capsys, 1, ["--task", "mqar", "--device", "cuda:0", *out] if not torch.cuda.is_available()
                   else ["--task", "mqar", "--device", "tpu", *out], "--device")
    one_line_error(capsys, 1, ["--task", "mqar", "--device", "meta", *out], "--device", "cuda, cuda:N or cpu")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    one_line_error(capsys, 1, ["--task", "mqar", *out], "--out", "saved no checkpoint", "remove it")


def test_resume_keeps_the_data_and_the_global_batch(capsys, tmp_path):
    run = tmp_path / "run"
    assert train(*QUICK, "--out", run) == 0
    capsys.readouterr()
    one_line_error(capsys, 1, ["--resume", run, "--seq-len", 64], "--seq-len", "32")
    one_line_error(capsys, 1, ["--resume", run, "--batch-size", 4], "global batch", "2")
    one_line_error(capsys, 1, ["--resume", run, "--config", "340m"], "differs from the resumed run")
    one_line_error(capsys, 1, ["--resume", run], "--steps", "more than 2")
    one_line_error(capsys, 1, [*QUICK, "--out", run], "--out", "already holds a run", "--resume")
    other = tmp_path / "other"  # resumed into another run's folder: refused, that run untouched
    assert train(*QUICK, "--seed", 1, "--out", other) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    one_line_error(capsys, 1, ["--resume", run, "--out", other, "--steps", 4], "--out", "another run")
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_a_run_on_relative_data_paths_resumes_from_another_folder(capsys, tmp_path, monkeypatch):
    """--data given relative to the working folder is kept absolute: --resume works from another
    folder, with the data left out or given again by another spelling of the same path."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    (start / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "run"
    monkeypatch.chdir(start)
    assert train("--config", "tiny", "--data", "corpus.txt", "--seq-len", 32, "--batch-size", 2, "--steps", 1,
                 "--no-compile", "--out", run) == 0
    monkeypatch.chdir(elsewhere)
    assert train("--resume", run, "--steps", 2) == 0
    assert train("--resume", run, "--steps", 3, "--data", "../start/./corpus.txt") == 0
    assert sorted(losses(run)) == [1, 2, 3]
    capsys.readouterr()
    (elsewhere / "corpus.txt").write_text("other words")
    one_line_error(capsys, 1, ["--resume", run, "--steps", 4, "--data", "corpus.txt"], "--data",
                   "the resumed run used")
    (start / "corpus.txt").rename(elsewhere / "moved.txt")  # the data moved: given anew, taken
    assert train("--resume", run, "--steps", 4, "--data", "moved.txt") == 0


def test_a_run_stopped_before_its_final_model_resumes_to_write_it(capsys, tmp_path):
    """Stopped after its last checkpoint, before the final model was written: --resume writes the
    model (and the final evaluation) without training; once written, there is nothing to resume."""
    run = tmp_path / "run"
    assert train(*QUICK, "--out", run) == 0
    expected = MomForCausalLM.from_pretrained(run).state_dict()
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink()
    assert train("--resume", run) == 0
    got = MomForCausalLM.from_pretrained(run).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in got.items())
    evals = [r for r in read_metrics(str(run / "metrics.jsonl")) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2]
    capsys.readouterr()
    one_line_error(capsys, 1, ["--resume", run], "--steps", "more than 2")


def test_resume_applies_a_new_learning_rate(tmp_path):
    """--lr given on --resume takes effect at the next step (it was silently the saved one's); a
    plain resume keeps the schedule exactly."""
    from mom_compile.train.optim import warmup_cosine
    run = tmp_path / "run"
    assert train(*QUICK, "--out", run) == 0
    for out, lr in ((tmp_path / "same", 1e-3), (tmp_path / "new", 0.5)):
        given = [] if lr == 1e-3 else ["--lr", lr]
        assert train("--resume", run, "--out", out, "--steps", 4, *given) == 0
        logged = {r["step"]: r["lr"] for r in read_metrics(str(out / "metrics.jsonl")) if "lr" in r}
        factor = warmup_cosine(0, 4, 0.1)
        assert logged[3] == pytest.approx(lr * factor(2), rel=1e-12)
        assert logged[4] == pytest.approx(lr * factor(3), rel=1e-12)


@pytest.mark.parametrize("damage, part", [
    (lambda c: (c / "trainer_state.json").write_text('{"step": 2'), "trainer_state.json"),
    (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json: no step"),
    (lambda c: (c / "config.json").unlink(), "config.json"),
    (lambda c: next(c.glob("*.distcp")).unlink(), "parameters and optimizer state"),
    (lambda c: (c / ".metadata").write_bytes(b"cut"), "parameters and optimizer state"),
    (lambda c: (c / "rng" / "rank-0.pt").write_bytes(b"cut"), "rank-0.pt"),
])
def test_a_damaged_checkpoint_is_named(capsys, tmp_path, damage, part):
    run = tmp_path / "run"
    assert train(*QUICK, "--steps", 4, "--save-every", 2, "--out", run) == 0
    capsys.readouterr()
    damage(run / "checkpoints" / "step-000004")
    one_line_error(capsys, 1, ["--resume", run, "--steps", 6], "step-000004", "is damaged", part,
                   "resume from an earlier checkpoint")
    # the earlier one still resumes
    assert train("--resume", run / "checkpoints" / "step-000002", "--steps", 3) == 0


def test_a_malformed_tokenizer_config_is_named(capsys, tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models
    folder = tmp_path / "tok"
    folder.mkdir()
    words = models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")
    Tokenizer(words).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    (tmp_path / "data.txt").write_text("a b " * 100)
    args = ["--data", tmp_path / "data.txt", "--tokenizer", folder, "--out", tmp_path / "run"]
    one_line_error(capsys, 1, args, "--tokenizer", "tokenizer_config.json")


def test_a_cuda_index_past_the_machines_devices_is_one_error(capsys, monkeypatch, tmp_path):
    """--device cuda:3 on a machine of one GPU (faked: CUDA reported with one device) names the
    devices there are, before anything touches the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(capsys, 1, ["--task", "mqar", "--device", "cuda:3", "--out", tmp_path / "run"],
                   "--device", "'cuda:3'", "1 CUDA device(s) (cuda:0 to cuda:0)")
    assert not (tmp_path / "run").exists()


def test_pruning_keeps_the_newest_steps_past_a_million(tmp_path):
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (tmp_path / checkpoint_module.checkpoint_name(step)).mkdir()
    checkpoint_module._prune(str(tmp_path), keep=2, written=1_000_001)
    assert sorted(os.listdir(tmp_path)) == ["step-1000000", "step-1000001"]


def test_pruning_after_a_resume_from_an_earlier_step_keeps_the_new_checkpoint(tmp_path):
    """A run resumed from step 1 of 3 that saves step 2 with --keep-checkpoints 1: the new step 2
    stays (it is `latest`), step 1 goes, and the abandoned step 3 waits for the run to reach it."""
    for step in (1, 2, 3):
        (tmp_path / checkpoint_module.checkpoint_name(step)).mkdir()
    checkpoint_module._prune(str(tmp_path), keep=1, written=2)
    assert sorted(os.listdir(tmp_path)) == [checkpoint_module.checkpoint_name(s) for s in (2, 3)]


CPU_OUT_OF_MEMORY = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 8000000000 bytes")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError(CPU_OUT_OF_MEMORY)])
def test_out_of_memory_says_what_to_reduce(capsys, tmp_path, monkeypatch, error):
    def no_memory(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(MomForCausalLM, "forward", no_memory)
    one_line_error(capsys, 1, [*QUICK, "--out", tmp_path / "run"], "out of memory", "--batch-size",
                   "--grad-accum", "--grad-checkpointing", "--seq-len", "torchrun")


def test_grad_checkpointing_trains_the_same_steps(tmp_path, monkeypatch):
    """--grad-checkpointing recomputes blocks in the backward: the same losses, step for step."""
    from mom_compile.graphs import model as model_module
    recomputed = []

    def counted(*args, **kwargs):
        recomputed.append(1)
        return checkpoint(*args, **kwargs)
    monkeypatch.setattr(model_module, "checkpoint", counted)
    runs = [tmp_path / "plain", tmp_path / "recomputed"]
    assert train(*QUICK, "--steps", 3, "--out", runs[0]) == 0
    assert not recomputed
    assert train(*QUICK, "--steps", 3, "--grad-checkpointing", "--out", runs[1]) == 0
    assert len(recomputed) == 3 * 2  # every step, every block of the tiny model
    assert losses(runs[1]) == losses(runs[0]) and len(losses(runs[0])) == 3


def test_grad_checkpointing_recomputes_a_model_from_init_from(tmp_path, monkeypatch):
    """--init-from loads an eval-mode model (from_pretrained's convention); training sets train
    mode, without which gradient checkpointing would silently keep every activation."""
    from mom_compile.graphs import model as model_module
    recomputed = []

    def counted(*args, **kwargs):
        recomputed.append(1)
        return checkpoint(*args, **kwargs)
    monkeypatch.setattr(model_module, "checkpoint", counted)
    MomForCausalLM(MomConfig.preset("tiny")).save_pretrained(tmp_path / "init")
    run = [arg for arg in QUICK if arg not in ("--config", "tiny")] + ["--init-from", tmp_path / "init"]
    assert train(*run, "--grad-checkpointing", "--out", tmp_path / "run") == 0
    assert len(recomputed) == 2 * 2  # every step, every block of the tiny model


def test_grad_checkpointing_scan_states_trains_the_same_steps(tmp_path, monkeypatch):
    """--grad-checkpointing scan_states has every layer's scan recompute its chunk states in the
    backward: the same losses, step for step."""
    kept = []
    real = MomForCausalLM.gradient_checkpointing_enable

    def recorded(model, scope="blocks"):
        real(model, scope)
        kept.extend(block.attn.keep_scan_states for block in model.model.layers)
    monkeypatch.setattr(MomForCausalLM, "gradient_checkpointing_enable", recorded)
    runs = [tmp_path / "plain", tmp_path / "recomputed"]
    assert train(*QUICK, "--steps", 3, "--out", runs[0]) == 0
    assert train(*QUICK, "--steps", 3, "--grad-checkpointing", "scan_states", "--out", runs[1]) == 0
    assert kept == [False, False]  # both blocks of the tiny model
    assert losses(runs[1]) == losses(runs[0]) and len(losses(runs[0])) == 3


def test_a_failed_save_leaves_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = checkpoint_module._write_json

    def disk_full_at_step_2(path, value):
        if value.get("step") == 2:
            raise OSError(28, "No space left on device")
        real(path, value)
    monkeypatch.setattr(checkpoint_module, "_write_json", disk_full_at_step_2)
    one_line_error(capsys, 1, [*QUICK, "--steps", 3, "--save-every", 1, "--out", run],
                   "checkpoint", "No space left on device")
    assert resolve_checkpoint(str(run)).endswith("step-000001")
    assert os.path.isdir(run / "checkpoints" / ".tmp-step-000002")
    monkeypatch.undo()
    assert train("--resume", run) == 0
    assert sorted(losses(run)) == [1, 2, 3]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp")]


def wait_for_checkpoint(run, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if resolve_checkpoint(str(run)).endswith(f"step-{step:06d}"):
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} appeared: {process.poll()}")


def test_ctrl_c_inside_a_compiler_error_is_an_interruption(tmp_path, monkeypatch, capsys):
    """Ctrl-C while torch.compile compiles reaches the trainer inside the compiler's own error
    (a RuntimeError raised from the KeyboardInterrupt): the run ends as interrupted, exit 130."""
    from mom_compile.train import cli
    from mom_compile.train.trainer import Trainer

    def fit(self):
        raise wrapped_interrupt()
    monkeypatch.setattr(Trainer, "fit", fit)
    assert cli.main([str(a) for a in (*QUICK, "--out", tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted: at step 0; no checkpoint was written yet" in err and "Traceback" not in err, err


def test_ctrl_c_inside_a_checkpoint_read_or_write_is_an_interruption(tmp_path, monkeypatch, capsys):
    """DCP wraps a Ctrl-C during a checkpoint's write or read in its CheckpointException (a
    BaseException): the run ends as interrupted, exit 130, not with a traceback or by calling a good
    checkpoint damaged."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from mom_compile.train import cli

    run = tmp_path / "run"
    args = [str(a) for a in (*QUICK, "--steps", 1, "--save-every", 1, "--no-compile", "--out", run)]
    assert cli.main(args) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise CheckpointException("checkpoint failed", {0: (KeyboardInterrupt(), traceback.StackSummary())})
    for name in ("load", "save"):  # resuming reads step 1; a run of its own writes step 1
        with monkeypatch.context() as m:
            m.setattr(checkpoint_module.dcp, name, interrupted)
            again = ["--resume", str(run), "--steps", "2"] if name == "load" else \
                [*args[:-1], str(tmp_path / "other")]
            assert cli.main(again) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "damaged" not in err and "Traceback" not in err, (name, err)
    assert cli.main(["--resume", str(run), "--steps", "2"]) == 0  # step 1 was good all along


def test_ctrl_c_and_kill_leave_a_checkpoint_to_resume(tmp_path):
    run = tmp_path / "run"
    args = [*QUICK, "--steps", 500, "--save-every", 1, "--keep-checkpoints", 3, "--out", run]
    process = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env(), cwd=ROOT, preexec_fn=default_signals)
    wait_for_checkpoint(run, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and f"--resume {run}" in err and "Traceback" not in err, err

    # continue, then kill -9 at an arbitrary moment of saving every step
    process = subprocess.Popen(command("--resume", run), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    stopped_at = int(resolve_checkpoint(str(run))[-6:])
    wait_for_checkpoint(run, stopped_at + 2, process)
    time.sleep(0.1)
    process.kill()
    process.wait(timeout=60)
    latest = int(resolve_checkpoint(str(run))[-6:])
    assert train("--resume", run, "--steps", latest + 1) == 0
    assert sorted(losses(run)) == list(range(1, latest + 2))
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp")]


def test_a_run_saved_before_checkpointing_scopes_resumes_with_blocks():
    """Runs saved when --grad-checkpointing was a flag stored true or false; true means blocks."""
    from argparse import Namespace

    from mom_compile.train.options import DEFAULTS, settle
    left_out = Namespace(**{name: None for name in DEFAULTS})
    assert settle(left_out, {"grad_checkpointing": True})[0].grad_checkpointing == "blocks"
    assert settle(left_out, {"grad_checkpointing": False})[0].grad_checkpointing is False
    assert settle(left_out, {"grad_checkpointing": "scan_states"})[0].grad_checkpointing == "scan_states"


def test_a_resume_can_turn_the_saved_switches_off():
    """--no-compile, --no-plot and --grad-checkpointing off given with --resume override a run
    saved with them on (they could only be turned on, so a resume without matplotlib failed)."""
    from mom_compile.train.cli import build_parser
    from mom_compile.train.options import settle
    saved = {"compile": False, "plot": True, "grad_checkpointing": "blocks"}
    switches = ["--compile", "--no-plot", "--grad-checkpointing", "off"]
    given = build_parser().parse_args(["--resume", "run", *switches])
    settled = settle(given, saved)[0]
    assert (settled.compile, settled.plot, settled.grad_checkpointing) == (True, False, False)
    kept = settle(build_parser().parse_args(["--resume", "run"]), saved)[0]
    assert (kept.compile, kept.plot, kept.grad_checkpointing) == (False, True, "blocks")


def test_tokens_per_second_leave_out_the_first_steps_compilation(tmp_path, monkeypatch):
    """The first step (torch.compile compiles in it) is not in the first logged rate, which would
    otherwise read a fraction of the real one: on a clock where the first step takes 100 s and
    every other one 1 s, steps 2 and 3 are logged at 1 s each."""
    import types

    from mom_compile.train import metrics, trainer
    now = [0.0]
    clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
    clock.perf_counter = lambda: now[0]
    monkeypatch.setattr(metrics, "time", clock)
    monkeypatch.setattr(trainer, "time", clock)
    real, calls = trainer.Trainer._train_step, []

    def timed(self, step):
        now[0] += 100.0 if not calls else 1.0
        calls.append(step)
        return real(self, step)
    monkeypatch.setattr(trainer.Trainer, "_train_step", timed)
    run = tmp_path / "run"
    assert train(*QUICK, "--steps", 3, "--log-every", 3, "--out", run) == 0
    record = next(r for r in read_metrics(str(run / "metrics.jsonl")) if "tokens_per_s" in r)
    assert record["step"] == 3 and record["tokens_per_s"] == 2 * 32 / 1.0, record  # batch 2 x seq-len 32



def test_a_resume_logs_the_losses_of_the_run_it_continues(tmp_path):
    """With checkpoints between log steps (--save-every 2, --log-every 4), a run resumed from step
    6 records the same losses as the run that went on: a checkpoint closes the log window."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    quick = [*QUICK, "--steps", 8, "--log-every", 4, "--save-every", 2, "--keep-checkpoints", 0]
    assert train(*quick, "--out", full) == 0
    assert train("--resume", full / "checkpoints" / "step-000006", "--out", resumed) == 0
    assert sorted(losses(full)) == [2, 4, 6, 8]
    assert losses(resumed) == {8: losses(full)[8]}

