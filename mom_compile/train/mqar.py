"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"), generated on the device.

Each sequence of T tokens starts with P key-value pairs, then asks every key once more at a later
position; the model must answer with its value:

    k1 v1 k2 v2 k3 v3 | n k2 v2 n n k1 v1 n k3 v3 n n ...      (n: a random token)
                             ^^         ^^     ^^    scored: the value after each asked key

Keys are P distinct ids from the lower half of the vocabulary (0 excluded), values any ids of the
upper half. The asked keys sit in P of the (T - 2P) // 2 two-token slots after the pairs, drawn
without replacement with probability proportional to slot^(alpha - 1), alpha = 0.01 (Zoology's
power law: most keys are asked soon after the pairs), the i-th pair in the i-th drawn slot. Only
the answers carry labels, so the loss and the accuracy measure recall alone. A batch mixes the
pair counts of `pairs` (one drawn per sequence); `batch(..., pairs=p)` fixes it (evaluation).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import IGNORE_INDEX, derive_seed

POWER_A = 0.01


def check_mqar(vocab_size: int, seq_len: int, pairs: Sequence[int]) -> str | None:
    """Why (vocab_size, seq_len, pairs) cannot make MQAR sequences, or None."""
    if not pairs or min(pairs) < 1:
        return f"expected positive pair counts, got {list(pairs)}"
    if 4 * max(pairs) > seq_len:
        return (f"{max(pairs)} pairs need --seq-len >= {4 * max(pairs)} (the pairs and as many "
                f"asked keys, two tokens each), got {seq_len}")
    if max(pairs) > vocab_size // 2 - 1:
        return (f"{max(pairs)} distinct keys need a vocabulary of at least {2 * max(pairs) + 2} ids "
                f"(keys from its lower half), got {vocab_size}")
    return None


class Mqar:
    """MQAR batches: global batch `step` is a function of (seed, step) alone."""

    def __init__(self, vocab_size: int, seq_len: int, pairs: Sequence[int], global_batch: int,
                 seed: int) -> None:
        problem = check_mqar(vocab_size, seq_len, pairs)
        if problem:
            raise ValueError(problem)
        self.vocab_size, self.seq_len, self.pairs = vocab_size, seq_len, tuple(pairs)
        self.global_batch, self.seed = global_batch, seed
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._eval_sets: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._choices: dict[torch.device, torch.Tensor] = {}  # the pair counts, on each device

    def rows(self, step: int, start: int, stop: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None or self._cached[0] != step:
            generator = torch.Generator(device).manual_seed(derive_seed(self.seed, "mqar", step))
            self._cached = (step, *self.batch(self.global_batch, generator))
        return self._cached[1][start:stop], self._cached[2][start:stop]

    def eval_set(self, pairs: int, samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`samples` held-out sequences with `pairs` pairs each, from a stream training never sees
        (the same set for any number of processes)."""
        key = (pairs, samples, device)
        if key not in self._eval_sets:
            generator = torch.Generator(device).manual_seed(derive_seed(self.seed, "mqar-eval", pairs))
            self._eval_sets[key] = self.batch(samples, generator, pairs)
        return self._eval_sets[key]

    def batch(self, rows: int, generator: torch.Generator, pairs: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) [rows, seq_len] on the generator's device."""
        g, dev = generator, generator.device
        t, half = self.seq_len, self.vocab_size // 2
        if pairs is None:
            if dev not in self._choices:  # once per device: a list -> CUDA tensor copy syncs the host
                self._choices[dev] = torch.tensor(self.pairs, device=dev)
            choices = self._choices[dev]
            count = choices[torch.randint(len(choices), (rows,), generator=g, device=dev)]
        else:
            count = torch.full((rows,), pairs, device=dev)
        most = int(max(self.pairs) if pairs is None else pairs)
        pair = torch.arange(most, device=dev)
        used = pair < count[:, None]                                            # [rows, most]
        keys = torch.rand(rows, half - 1, generator=g, device=dev).argsort(-1)[:, :most] + 1
        values = torch.randint(half, self.vocab_size, (rows, most), generator=g, device=dev)
        # the asked slots: Gumbel top-k = sampling without replacement, in drawing order
        slots = (t - 2 * count[:, None]) // 2                                   # [rows, 1]
        fewest = min(self.pairs) if pairs is None else pairs
        slot = torch.arange((t - 2 * fewest) // 2, device=dev)
        weight = torch.log1p(slot.double()) * (POWER_A - 1)
        uniform = torch.rand(rows, slot.numel(), generator=g, device=dev, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
        score = (weight + gumbel).masked_fill(slot >= slots, -torch.inf)
        asked = 2 * count[:, None] + 2 * score.topk(most, dim=-1).indices      # position of the asked key

        # write into one spare column (index t) where a row has fewer than `most` pairs
        ids = torch.randint(self.vocab_size, (rows, t + 1), generator=g, device=dev)
        labels = torch.full((rows, t + 1), IGNORE_INDEX, device=dev)
        spare = torch.full_like(asked, t)
        for position, token in ((2 * pair, keys), (2 * pair + 1, values), (asked, keys), (asked + 1, values)):
            ids.scatter_(1, torch.where(used, position.expand_as(asked), spare), token)
        labels.scatter_(1, torch.where(used, asked + 1, spare), values)
        return ids[:, :t], labels[:, :t]
