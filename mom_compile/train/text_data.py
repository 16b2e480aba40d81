"""`--data FILE...`: local text and jsonl files, tokenized once, packed into rows of seq_len tokens.

A plain-text file is one document; each line of a `.jsonl` file is one (its `text_field`). The
documents are joined with an end-of-document id between them and the stream is cut into rows of
seq_len tokens (a last partial row is dropped); every token is a target. Each epoch visits every
row once, in an order drawn from the seed, and global batch `step` is rows [step * G, (step + 1) * G)
of that endless sequence: the step alone is the data position, and each rank reads only its slice.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from .data import derive_seed
from .errors import TrainError
from .metrics import format_count, format_duration


def read_documents(path: str, text_field: str) -> Iterator[str]:
    if os.path.isdir(path):
        raise TrainError(f"--data: {path!r} is a folder; expected a text or .jsonl file")
    if not os.path.isfile(path):
        raise TrainError(f"--data: no such file {path!r}")
    try:
        yield from _documents(path, text_field)
    except UnicodeDecodeError as e:
        raise TrainError(f"--data: {path!r} is not UTF-8 text ({e.reason}: a compressed or binary "
                         "file?); decompress or convert it first") from None


def _documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            yield f.read()
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"--data: {path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise TrainError(f"--data: {path}:{number} has no string field {text_field!r} "
                                 "(choose the field with --text-field)")
            yield record[text_field]


def tokenize_files(files: Sequence[str], tokenizer, text_field: str, eos_id: int | None,
                   report: Callable[[str], None] | None = None, every_s: float = 10.0) -> torch.Tensor:
    """Every document's ids, each followed by eos_id (when not None), as one int64 tensor. report,
    if given, hears where the work stands: at the start, every every_s seconds, and at the end."""
    report = report or (lambda message: None)
    parts, tokens, documents = [], 0, 0
    eos = np.array([] if eos_id is None else [eos_id], dtype=np.int64)
    start = last = time.perf_counter()
    report(f"tokenizing {len(files)} file(s)...")
    for i, path in enumerate(files):
        for text in read_documents(path, text_field):
            if text:
                parts += [np.asarray(tokenizer.encode(text), dtype=np.int64), eos]
                tokens, documents = tokens + parts[-2].size + eos.size, documents + 1
            if time.perf_counter() - last >= every_s:
                last = time.perf_counter()
                report(f"  {format_count(tokens)} tokens from {documents} documents so far (file {i + 1} of "
                       f"{len(files)}, {format_duration(last - start)})")
    report(f"tokenized {format_count(tokens)} tokens from {documents} documents "
           f"({format_duration(time.perf_counter() - start)})")
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)


class PackedText:
    """Rows of `seq_len` tokens from local files, in a seeded order per epoch."""

    def __init__(self, files: Sequence[str], tokenizer, text_field: str, seq_len: int,
                 global_batch: int, seed: int, vocab_size: int, eos_id: int | None,
                 report: Callable[[str], None] | None = None) -> None:
        tokens = tokenize_files(files, tokenizer, text_field, eos_id, report)
        if tokens.numel() < seq_len:
            raise TrainError(f"--data: the files hold {tokens.numel()} tokens, fewer than one row of "
                             f"--seq-len {seq_len}")
        if int(tokens.max()) >= vocab_size:
            raise TrainError(f"--tokenizer: the data has token ids up to {int(tokens.max())}, but the "
                             f"model's vocab_size is {vocab_size}")
        self.num_rows = tokens.numel() // seq_len
        self.table = tokens[:self.num_rows * seq_len].view(self.num_rows, seq_len)
        self.num_tokens = tokens.numel()
        self.global_batch, self.seed = global_batch, seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "text", epoch))
            self._orders[epoch] = torch.randperm(self.num_rows, generator=generator)
        return self._orders[epoch]

    def rows(self, step: int, start: int, stop: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) [stop - start, seq_len] of rows start..stop of global batch `step`."""
        index = torch.arange(start, stop) + step * self.global_batch
        first, last = int(index[0]) // self.num_rows, int(index[-1]) // self.num_rows  # consecutive rows
        orders = torch.cat([self._order(epoch) for epoch in range(first, last + 1)])
        picked = orders[index - first * self.num_rows]
        ids = self.table[picked].to(device, non_blocking=True)
        return ids, ids
