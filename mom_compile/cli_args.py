"""Argument types shared by the command-line tools (`python -m mom_compile.train` and
`python -m mom_compile.export`) and the benchmarks: each parses one option's text or raises
argparse's error, which names the option."""
from __future__ import annotations

import argparse


def seed(text: str) -> int:
    """A random seed: what torch.manual_seed takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2^63, 2^64), got {text}")
    return value


def check_batch_layouts(parser: argparse.ArgumentParser, tokens: int, ts: list[int]) -> None:
    """--tokens split into sequences of each T in --ts: T must divide it (else a table's rows would
    hold fewer tokens than its header says)."""
    for t in ts:
        if t < 1 or t > tokens or tokens % t:
            parser.error(f"--ts: each T must divide --tokens {tokens} (B = tokens / T sequences), got {t}")


def int_at_least(low: int):
    """An argument type: an integer of at least `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value
    return parse


def path(text: str) -> str:
    """A file or folder name: an empty one would mean the working folder, by accident."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text
