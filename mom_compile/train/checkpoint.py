"""Training checkpoints: what a run needs to continue bit-for-bit, written so that no interruption
leaves a broken one.

    OUT/checkpoints/step-000100/  .metadata, *.distcp  parameters and AdamW state, through
                                                       torch.distributed.checkpoint: each process
                                                       writes its shards, any process count reads them
                                  trainer_state.json   step, scheduler, run arguments, data position
                                  config.json          the model's MomConfig
                                  rng/rank-N.pt        each process's random generator states
    OUT/checkpoints/latest        the name of the newest complete checkpoint

A checkpoint is written under a temporary name (.tmp-step-000100) and renamed once complete, then
`latest` is replaced through a temporary file and os.replace. A run killed at any point leaves at
worst a .tmp-* folder (the next run removes it), and `latest` always names a complete checkpoint.
The parameters are stored under their module names (`in_proj`, not the reference layout's names);
the final model of a run is what `save_pretrained` writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..interrupts import caused_by_interrupt, replace_files
from .distributed import World
from .errors import TrainError

FOLDER = "checkpoints"
LATEST = "latest"
STATE_NAME = "trainer_state.json"
PREFIX = "step-"
TMP = ".tmp-"
STATE_KEYS = ("step", "scheduler", "args", "global_batch")  # what a resumed run reads of trainer_state.json


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


@contextlib.contextmanager
def _dcp_call():
    """Around a DCP save or load: quiet about running in one process when there is no process
    group (intended), and an interruption that DCP wrapped in its CheckpointException (a
    BaseException holding each process's failure) raised as the KeyboardInterrupt it was, not
    reported as a failed write or a damaged checkpoint."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as e:  # failures: each process's (error, stack)
        if caused_by_interrupt(e) or any(caused_by_interrupt(error) for error, _ in e.failures.values()):
            raise KeyboardInterrupt from None
        raise


def _write_json(path: str, value: dict) -> None:
    """Into the checkpoint's temporary folder, which is renamed whole once complete."""
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(py_state), py_gauss]}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def remove_partial(out: str, world: World) -> None:
    """Delete what an interrupted save left behind (process 0, before anything else is written)."""
    root = os.path.join(out, FOLDER)
    if world.main and os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TMP):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    world.barrier()


def save_checkpoint(out: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, config_dict: dict, world: World, keep: int) -> str:
    """Write checkpoint `step` (a collective: every process calls it) and return its folder."""
    root = os.path.join(out, FOLDER)
    name = checkpoint_name(step)
    tmp, final = os.path.join(root, TMP + name), os.path.join(root, name)
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    world.barrier()
    state = {"model": dict(model.named_parameters()), "optim": get_optimizer_state_dict(model, optimizer)}
    with _dcp_call():
        dcp.save(state, checkpoint_id=tmp)
    torch.save(_rng_state(world.device), os.path.join(tmp, "rng", f"rank-{world.rank}.pt"))
    world.barrier()
    if world.main:
        _write_json(os.path.join(tmp, STATE_NAME), trainer_state)
        _write_json(os.path.join(tmp, "config.json"), config_dict)
        if os.path.exists(final):  # the same step saved again (a resumed run): move the old one away
            os.replace(final, os.path.join(root, TMP + "old-" + name))
        os.replace(tmp, final)
        replace_files({os.path.join(root, LATEST): lambda file: Path(file).write_text(name + "\n")})
        shutil.rmtree(os.path.join(root, TMP + "old-" + name), ignore_errors=True)
        _prune(root, keep, step)
    world.barrier()
    return final


def _prune(root: str, keep: int, written: int) -> None:
    """Keep the newest `keep` checkpoints up to step `written`, the one just saved (0: keep all); a
    deleted one is renamed away first. Later ones, left by a run that was resumed from an earlier
    checkpoint, are neither counted nor deleted: the resumed run replaces each when it saves its step."""
    saved = (int(n[len(PREFIX):]) for n in os.listdir(root)
             if n.startswith(PREFIX) and n[len(PREFIX):].isdigit())
    steps = sorted(step for step in saved if step <= written)
    names = [checkpoint_name(step) for step in steps]  # by step: step-1000000 follows step-999999
    for name in names[:-keep] if keep > 0 else []:
        doomed = os.path.join(root, TMP + "delete-" + name)
        os.replace(os.path.join(root, name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder meant by `path`: a checkpoint itself, or a run folder (its latest)."""
    if os.path.isfile(os.path.join(path, STATE_NAME)):
        return path
    pointer = os.path.join(path, FOLDER, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            folder = os.path.join(path, FOLDER, f.read().strip())
        if os.path.isfile(os.path.join(folder, STATE_NAME)):
            return folder
    if not os.path.isdir(path):
        raise TrainError(f"--resume: {path!r} is not a folder")
    raise TrainError(f"--resume: {path!r} holds no checkpoint (expected a run folder with "
                     f"{FOLDER}/{LATEST}, or a {FOLDER}/{PREFIX}N folder)")


def damaged(folder: str, part: str, why) -> TrainError:
    """The error for a checkpoint that cannot be read back."""
    if isinstance(why, BaseException):
        lines = str(why).strip().splitlines()
        why = type(why).__name__ + (f": {lines[0]}" if lines else "")
    return TrainError(f"--resume: checkpoint {folder!r} is damaged ({part}: {why}); resume from an "
                      f"earlier checkpoint in {os.path.dirname(os.path.abspath(folder))!r}")


def read_trainer_state(folder: str) -> dict:
    try:
        with open(os.path.join(folder, STATE_NAME)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise damaged(folder, STATE_NAME, e) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else STATE_KEYS
    if missing:
        raise damaged(folder, STATE_NAME, f"no {', '.join(missing)}")
    return state


def load_checkpoint(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    world: World) -> None:
    """Load parameters, optimizer state and this process's RNG state in place (a collective)."""
    optim_state = get_optimizer_state_dict(model, optimizer)  # creates AdamW's state to load into
    state = {"model": dict(model.named_parameters()), "optim": optim_state}
    try:
        with _dcp_call():
            dcp.load(state, checkpoint_id=folder)
    except CheckpointException as e:  # DCP's wrapper (a BaseException) of each process's failure
        raise damaged(folder, "parameters and optimizer state", next(iter(e.failures.values()))[0]) from None
    except Exception as e:  # a missing or cut shard surfaces as any of several errors
        raise damaged(folder, "parameters and optimizer state", e) from None
    set_optimizer_state_dict(model, optimizer, optim_state)
    rng = os.path.join("rng", f"rank-{world.rank}.pt")
    if os.path.isfile(os.path.join(folder, rng)):  # absent when resuming on more processes than saved
        try:
            _set_rng_state(torch.load(os.path.join(folder, rng), weights_only=True), world.device)
        except Exception as e:
            raise damaged(folder, rng, e) from None
