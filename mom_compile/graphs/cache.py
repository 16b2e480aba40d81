"""The decoding cache: preallocated state buffers, updated in place (static addresses, so a decode
step can be captured in a CUDA graph).

Per layer and sequence there are `memory_slots` memories (the routed ones, then the shared one):
    recurrent [B, slots, H, K, V] float32 (float64 for a float64 model): each memory's state;
    conv      [B, slots, W-1, 2*H*K + H*V]: the last W-1 pre-conv (q | k | v) projections of each
              memory's own sub-sequence, oldest first (docs/math.md#decoding-state).
A memory that has seen no token has zero state, which is exactly "no history".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops._checks import check_int, check_writable
from ..ops.precision import compute_dtype
from .config import MomConfig


@dataclass
class LayerState:
    """One layer's states. A functional state (the export graphs') takes new tensors on update
    instead of writing into its own, so that a traced graph holds no mutation."""

    recurrent: torch.Tensor
    conv: torch.Tensor
    functional: bool = False

    def update(self, recurrent: torch.Tensor, conv: torch.Tensor) -> None:
        """Take the states after a forward. An in-place cache holds values, not autograd history:
        gradients stop at it, as at a detached RNN state (truncated backpropagation through time)."""
        if self.functional:
            self.recurrent, self.conv = recurrent, conv
        else:
            with torch.no_grad():
                self.recurrent.copy_(recurrent)
                self.conv.copy_(conv)


def conv_channels(config: MomConfig) -> int:
    return 2 * config.key_dim + config.value_dim


def state_specs(config: MomConfig, batch: int | str, dtype: torch.dtype) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of every state tensor, (recurrent, conv) per layer, for a model in `dtype`;
    `batch` may be a symbolic size or the name of a symbolic axis."""
    recurrent = (batch, config.memory_slots, config.num_heads, config.head_dim, config.head_v_dim)
    conv = (batch, config.memory_slots, config.conv_size - 1, conv_channels(config))
    return [(recurrent, compute_dtype(dtype)), (conv, dtype)] * config.num_hidden_layers


def zero_states(config: MomConfig, batch: int, dtype: torch.dtype, device=None) -> list[torch.Tensor]:
    """Zeroed state tensors (zero state is exactly "no history"), in `state_specs` order."""
    return [torch.zeros(shape, dtype=dt, device=device) for shape, dt in state_specs(config, batch, dtype)]


class MomCache:
    """Decoding state of every layer for a batch of `batch_size` sequences."""

    def __init__(
        self, config: MomConfig, batch_size: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("batch_size", batch_size, 1)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected the model's floating-point dtype, got {dtype}")
        self.layers = self._pair(zero_states(config, batch_size, dtype, device))
        if not torch.compiler.is_compiling():  # lets CUDA graphs (mode="reduce-overhead") update them
            for t in self.states():              # in place; a cache made inside a graph is its output
                torch._dynamo.mark_static_address(t)

    @staticmethod
    def _pair(states: list[torch.Tensor], functional: bool = False) -> list[LayerState]:
        return [LayerState(states[i], states[i + 1], functional) for i in range(0, len(states), 2)]

    @classmethod
    def from_states(cls, states: list[torch.Tensor], functional: bool = False) -> MomCache:
        """A cache over existing tensors, (recurrent, conv) per layer as `states()` lists them.
        They are updated in place, so they must be contiguous; with functional=True they are
        never written, and `states()` returns the new tensors after each forward."""
        if len(states) % 2:
            raise ValueError(f"states: expected (recurrent, conv) pairs, one per layer, got {len(states)} "
                             "tensors")
        for i, t in enumerate(states):
            if not functional and not t.is_contiguous():
                raise ValueError(f"states[{i}]: expected a contiguous tensor (it is updated in place)")
        cache = cls.__new__(cls)
        cache.layers = cls._pair(list(states), functional)
        return cache

    def states(self) -> list[torch.Tensor]:
        """Every state tensor, (recurrent, conv) per layer."""
        return [t for layer in self.layers for t in (layer.recurrent, layer.conv)]

    @property
    def batch_size(self) -> int:
        return self.layers[0].recurrent.shape[0]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerState:
        return self.layers[layer]

    def reset(self) -> None:
        """Forget every sequence, keeping the buffers (and their addresses). One multi-tensor
        launch per kind of state: a foreach kernel takes one dtype, so a list mixing the float32
        recurrent and bf16 conv states would zero them one launch each (2 x layers), and a
        prefill replayed from a CUDA graph right after waits on the host issuing them."""
        torch._foreach_zero_([layer.recurrent for layer in self.layers])
        torch._foreach_zero_([layer.conv for layer in self.layers])


def check_cache(name: str, cache, config: MomConfig, batch: int | None, dtype: torch.dtype,
                device: torch.device) -> None:
    """Raise naming `name` unless `cache` is a MomCache with the states that
    `MomCache(config, batch, dtype, device)` makes (a model's `new_cache(batch)`; batch None: any),
    writable in place now (its states are made together: one is looked at)."""
    if not isinstance(cache, MomCache):
        raise TypeError(f"{name}: expected a MomCache, got {type(cache).__name__}")
    batch = cache.batch_size if batch is None else batch
    specs = state_specs(config, batch, dtype)
    (recurrent, recurrent_dtype), (conv, conv_dtype) = specs[:2]
    expected = (f"{name}: expected what model.new_cache({batch}) makes: {config.num_hidden_layers} layers "
                f"of recurrent {list(recurrent)} {recurrent_dtype} and conv {list(conv)} {conv_dtype} "
                f"states on {device}, got ")
    states = cache.states()
    if len(states) != len(specs):
        raise ValueError(expected + f"{len(cache)} layers")
    for i, (t, (shape, dt)) in enumerate(zip(states, specs)):
        if t.shape != shape or t.dtype != dt or t.device != device:
            kind = "conv" if i % 2 else "recurrent"
            raise ValueError(expected + f"layer {i // 2}'s {kind} {list(t.shape)} {t.dtype} on {t.device}")
    check_writable(name, states[0])
