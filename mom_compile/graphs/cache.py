"""The decoding cache: preallocated state buffers, updated in place (static addresses, so a decode
step can be captured in a CUDA graph).

Per layer and sequence there are `memory_slots` memories (the routed ones, then the shared one):
    recurrent [B, slots, H, K, V] float32 (float64 for a float64 model): each memory's state;
    conv      [B, slots, W-1, 2*H*K + H*V]: the last W-1 pre-conv (q | k | v) projections of each
              memory's own sub-sequence, oldest first (spec section 6).
A memory that has seen no token has zero state, which is exactly "no history".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MomConfig


@dataclass
class LayerState:
    recurrent: torch.Tensor
    conv: torch.Tensor


def conv_channels(config: MomConfig) -> int:
    return 2 * config.key_dim + config.value_dim


class MomCache:
    """Decoding state of every layer for a batch of `batch_size` sequences."""

    def __init__(
        self, config: MomConfig, batch_size: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
        slots = config.memory_slots
        state_dtype = torch.promote_types(dtype, torch.float32)
        self.layers = [
            LayerState(
                recurrent=torch.zeros(batch_size, slots, config.num_heads, config.head_dim,
                                      config.head_v_dim, dtype=state_dtype, device=device),
                conv=torch.zeros(batch_size, slots, config.conv_size - 1, conv_channels(config),
                                 dtype=dtype, device=device),
            )
            for _ in range(config.num_hidden_layers)
        ]
        if not torch.compiler.is_compiling():  # lets CUDA graphs (mode="reduce-overhead") update them
            for state in self.layers:            # in place; a cache made inside a graph is its output
                torch._dynamo.mark_static_address(state.recurrent)
                torch._dynamo.mark_static_address(state.conv)

    @property
    def batch_size(self) -> int:
        return self.layers[0].recurrent.shape[0]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerState:
        return self.layers[layer]

    def reset(self) -> None:
        """Forget every sequence, keeping the buffers (and their addresses)."""
        for state in self.layers:
            state.recurrent.zero_()
            state.conv.zero_()
