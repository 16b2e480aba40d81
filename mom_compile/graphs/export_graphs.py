"""The export graphs: prefill and one decode step as pure functions of flat tensors.

`MomForCausalLM` advances a `MomCache` in place, which an exported graph cannot express. These
wrappers make the state explicit instead: the decode step takes every state tensor as an input
(`past.<layer>.<name>`) into a functional cache, whose layers take new tensors instead of writing
into the old ones, and returns them (`present.<layer>.<name>`): a tracer sees state in -> new
state out, and the caller's tensors are never written.

Prefill has no past: its cache starts as zeros (zero state is exactly "no history"), sized from
the input batch so that batch stays a dynamic axis.

State names, in order, per layer: `recurrent` [B, slots, H, K, V] and `conv` [B, slots, W-1, C]
(see `cache.py`). Present names follow the same order, so present[i] feeds past[i].
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .cache import MomCache, zero_states
from .config import MomConfig
from .model import MomForCausalLM

STATE_NAMES = ("recurrent", "conv")


def state_names(config: MomConfig, prefix: str) -> list[str]:
    """`<prefix>.<layer>.<name>` for every state tensor, in graph order."""
    return [f"{prefix}.{i}.{name}" for i in range(config.num_hidden_layers) for name in STATE_NAMES]


class PrefillGraph(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> (logits [B, 1, vocab] of the last position,
    which is all generation reads, *present states)."""

    def __init__(self, model: MomForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight = self.model.lm_head.weight
        states = zero_states(self.model.config, input_ids.shape[0], weight.dtype, weight.device)
        cache = MomCache.from_states(states, functional=True)
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1)
        return (out.logits, *cache.states())


class DecodeStepGraph(nn.Module):
    """(input_ids [B, 1], past states) -> (logits [B, 1, vocab], *present states)."""

    def __init__(self, model: MomForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = MomCache.from_states(past, functional=True)
        out = self.model(input_ids, past_key_values=cache)
        return (out.logits, *cache.states())
