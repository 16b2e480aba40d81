"""What the training loop asks of its data, and the seeds that make every batch reproducible.

A source is a deterministic function of (seed, step): `rows(step, start, stop, device)` returns the
rows start..stop of global batch `step` as (input_ids, labels) [rows, seq_len], labels -100 where
nothing is scored (the model shifts them by one). So the data position of a run is its step, a
resumed run sees exactly the batches it would have seen, and each rank asks for its own slice.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from mom_compile.graphs.loss import IGNORE_INDEX


class Source(Protocol):
    def rows(self, step: int, start: int, stop: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and names: independent streams for (seed, use, index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[correct, scored] (int64, on the device, no host sync): argmax of logits[:, t] against
    labels[:, t + 1] over the scored positions."""
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == target) & scored
    return torch.stack([correct.sum(), scored.sum()])
