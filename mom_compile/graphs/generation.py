"""Autoregressive generation: one prefill over the prompt, then one cached decode step per token.

Decode steps pass no attention mask (a new token is never padding), so every step has the same
shapes: a compiled `forward` (`model.forward = torch.compile(model.forward)`) is traced once for
the decode step and reused.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def pick_next_token(
    logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids [B] from last-position logits [B, vocab]: argmax, or a sample from the softmax
    of logits / temperature restricted to the top_k ids and to the smallest set whose
    probability reaches top_p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keeps the id that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, vocab_size) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1] or None, got {top_p}")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.numel() \
            and not input_ids.is_floating_point():
        lo, hi = int(input_ids.min()), int(input_ids.max())  # eager API boundary: one sync
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids: ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.numel() \
            and not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError("attention_mask: generate expects left padding (the last column all 1); "
                         "a right-padded prompt would continue from a padding position")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched generation with left padding. Returns [B, T + n] ids, n <= max_new_tokens: it stops
    early once every sequence has produced an eos id; a finished sequence is filled with
    pad_token_id (default: the config's, else the first eos id)."""
    config = model.config
    _check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, config.vocab_size)
    eos = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0]
    if max_new_tokens == 0:
        return input_ids
    # The cache is made here, outside any compiled forward, so that its buffers are static
    # addresses that a CUDA-graph decode step may update in place.
    cache = model.new_cache(input_ids.shape[0], device=input_ids.device)
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    eos_ids = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = [input_ids]
    for step in range(max_new_tokens):
        next_ids = pick_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        next_ids = torch.where(finished, pad_token_id, next_ids).to(input_ids.dtype)
        tokens.append(next_ids[:, None])
        if eos:
            finished |= torch.isin(next_ids, eos_ids)
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            out = model(next_ids[:, None], past_key_values=cache, use_cache=True)
    return torch.cat(tokens, dim=1)
