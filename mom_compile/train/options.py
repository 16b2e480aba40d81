"""The run's settings: the command line over the defaults, or, on --resume, over the settings of
the run it continues (so `--resume OUT` alone continues a run as it was started)."""
from __future__ import annotations

import argparse
import os

DEFAULTS = dict(
    seq_len=256, steps=1000, batch_size=16, grad_accum=1, lr=1e-3, warmup_steps=None, min_lr_ratio=0.1,
    weight_decay=0.1, betas=[0.9, 0.95], grad_clip=1.0, precision="auto", compile=True,
    grad_checkpointing=False, seed=0, save_every=500, keep_checkpoints=2, log_every=10, eval_every=0,
    eval_samples=512, plot=False,
    text_field="text", task=None, data=None, tokenizer=None, mqar_pairs=None, mqar_vocab=None,
    device=None,
)
MODEL_ARGS = ("config", "config_json", "init_from")
# what decides the batches a run sees: a resumed run keeps them
DATA_ARGS = ("task", "data", "tokenizer", "text_field", "seq_len", "mqar_pairs", "mqar_vocab", "seed")
# run-local: never taken from the run being resumed
LOCAL_ARGS = ("out", "resume", "device")
# files and folders, kept absolute: a run resumes from any working folder
PATH_ARGS = ("data", "tokenizer", "config_json", "init_from")


def settle(args: argparse.Namespace, saved: dict | None) -> tuple[argparse.Namespace, list[str]]:
    """Fill the arguments left out (None) from `saved` (a resumed run's settings) or the defaults.
    Returns the settings and the names of data arguments given with a value other than saved."""
    values, conflicts = vars(args).copy(), []
    for name in PATH_ARGS:
        values[name] = _absolute(values.get(name))
    for name, default in DEFAULTS.items():
        given = values.get(name)
        if saved is not None and name not in LOCAL_ARGS and name in saved:
            kept = _absolute(saved[name]) if name in PATH_ARGS else saved[name]
            if given is None:
                values[name] = kept
            elif name in DATA_ARGS and not _same(name, given, kept):
                conflicts.append(name)
        if values.get(name) is None:
            values[name] = default
    if values["grad_checkpointing"] is True:  # saved by a run from before there were scopes
        values["grad_checkpointing"] = "blocks"
    if values["grad_checkpointing"] == "off":
        values["grad_checkpointing"] = False
    return argparse.Namespace(**values), conflicts


def _absolute(path):
    """A path (or a list of them) made absolute; a run from before paths were kept absolute saved
    them relative to its working folder, taken to be this one."""
    if isinstance(path, (list, tuple)):
        return [os.path.abspath(p) for p in path]
    return None if path is None else os.path.abspath(path)


def _same(name: str, given, saved) -> bool:
    """Whether a data argument given on --resume is the saved one: paths by the files they name,
    and a saved path that no longer exists matches any (the data moved with the run)."""
    if name not in PATH_ARGS:
        return _normal(given) == _normal(saved)
    given, saved = ([p] if isinstance(p, str) else list(p or []) for p in (given, saved))
    return len(given) == len(saved) and all(
        not os.path.exists(s) or os.path.realpath(g) == os.path.realpath(s) for g, s in zip(given, saved))


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def saved_settings(args: argparse.Namespace) -> dict:
    """The settings a checkpoint records (JSON values)."""
    return {k: _normal(v) for k, v in vars(args).items() if k not in LOCAL_ARGS}
