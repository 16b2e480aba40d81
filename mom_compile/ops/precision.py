"""The precision rule of the whole package (docs/math.md#precision): arithmetic runs in float32 at
least, whatever the storage dtype, and float64 stays float64, so that a float64 run is the
numerical oracle of every kernel. Norms, routing, decays, recurrent states and the kernels'
accumulators follow it; the Triton and ONNX dtype choices are derived from `compute_dtype`.
"""
from __future__ import annotations

import functools

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for operands of these dtypes: float64 if any is float64, else float32."""
    return functools.reduce(torch.promote_types, dtypes, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in its compute dtype (a no-op for float32 and float64)."""
    return x.to(compute_dtype(x.dtype))
