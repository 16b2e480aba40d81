"""Triton CUDA kernel of `mom::gated_rms_norm`: one program per (token, head) reads the head's V
values of y (of each of its k rows, with mix) and of the gate once and writes the gated norm
once, in the output dtype."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .launch import launch
from .layout import last_dim_contiguous, next_power_of_2
from .triton_precision import compute_type


@triton.jit
def _gated_rms_norm_kernel(y, z, weight, mix, out, eps, z_stride, H: tl.constexpr, V: tl.constexpr,
                           CHOICES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_MIX: tl.constexpr,
                           BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_V)
    ok = cols < V
    at = (row * H + head) * V + cols
    if HAS_MIX:
        x = tl.zeros((BLOCK_V,), dtype=COMPUTE)
        for i in tl.static_range(CHOICES):
            w = tl.load(mix + row * CHOICES + i).to(COMPUTE)
            x += w * tl.load(y + ((row * CHOICES + i) * H + head) * V + cols, mask=ok, other=0.0).to(COMPUTE)
    else:
        x = tl.load(y + at, mask=ok, other=0.0).to(COMPUTE)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / V + eps)
    o = x * r * tl.load(weight + cols, mask=ok, other=0.0).to(COMPUTE)
    if HAS_GATE:
        g = tl.load(z + row * z_stride + head * V + cols, mask=ok, other=0.0).to(COMPUTE)
        o = o * g * tl.sigmoid(g)
    tl.store(out + at, o.to(out.dtype.element_ty), mask=ok)


def gated_rms_norm_triton(y, z, weight, eps: float, dtype: torch.dtype, mix=None):
    """Same contract as `mom::gated_rms_norm`: out [..., H, V] in `dtype`; z is read through its
    row stride."""
    *lead, h, v = y.shape
    choices = 1
    if mix is not None:
        *lead, choices = mix.shape
        mix = mix.contiguous()
    rows = math.prod(lead)
    y, weight = y.contiguous(), weight.contiguous()
    out = torch.empty(*lead, h, v, dtype=dtype, device=y.device)
    gate = None if z is None else last_dim_contiguous(z).reshape(rows, h * v)
    if rows * h > 0 and v > 0:
        launch(
            _gated_rms_norm_kernel, (rows, h),
            y, y if gate is None else gate, weight, y if mix is None else mix, out, eps,
            0 if gate is None else gate.stride(0), H=h, V=v, CHOICES=choices, HAS_GATE=gate is not None,
            HAS_MIX=mix is not None, BLOCK_V=next_power_of_2(v),
            COMPUTE=compute_type(*(t.dtype for t in (y, mix) if t is not None)),
            **pdl.launch_options(y.device))
    return out
