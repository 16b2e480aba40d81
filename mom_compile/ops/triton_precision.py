"""The precision rule (`precision.py`) in Triton's terms, shared by every Triton launcher."""
from __future__ import annotations

import struct

import torch
import triton.language as tl

from .precision import compute_dtype

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def compute_type(*dtypes: torch.dtype) -> tl.dtype:
    """The kernels' arithmetic dtype for operands of these dtypes: `compute_dtype` as a Triton dtype."""
    return _TRITON_DTYPES[compute_dtype(*dtypes)]


def split_scale(scale: float) -> tuple[float, float]:
    """Triton passes Python floats as float32; a float64 kernel rebuilds the exact scale from a
    float32 head and the float32 remainder (`hi + lo` in the kernel's compute type). Rounded on
    the host by `struct` (no tensor: a launcher calls this per launch)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, float(scale) - hi
