"""Tensor layouts the Triton launchers take as they are, and the power-of-two tile sizes they pick."""
from __future__ import annotations

import functools

import torch
import triton


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (any row strides: the kernels take them), else a
    contiguous copy."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


@functools.cache
def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2`, cached: Triton 3.7's goes through its constexpr-function wrapper,
    and the launchers of an eager decode step, which is bound by the host, ask once a layer."""
    return triton.next_power_of_2(n)
