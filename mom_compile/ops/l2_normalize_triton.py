"""Triton CUDA kernels of `mom::l2_normalize` and `mom::l2_normalize_backward`.

In eager PyTorch the formulas are five passes over the rows each way (the float32 copy, the
square, the sum, the product, the rounding); here each direction is one pass: a program holds a
block of rows, reads them once through their strides and writes y and r (or dx) once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .l2_normalize import L2_EPS
from .layout import last_dim_contiguous
from .precision import compute_dtype
from .triton_precision import compute_type

BLOCK_ROWS = 16


@triton.jit
def l2_scale(x, eps, AXIS: tl.constexpr):
    """r = (sum x^2 + eps)^-1/2 over AXIS: the norm's factor (memory_decode's kernel uses it too)."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=AXIS) + eps)


@triton.jit
def _l2_normalize_kernel(x, y, r, rows, inner, outer_stride, inner_stride, eps, D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
                         PDL: tl.constexpr):
    """Rows (outer, inner) of x [outer, inner, D] (strided, unit last stride) -> contiguous y, r."""
    pdl.enter(PDL)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (row < rows)[:, None] & (cols < D)[None, :]
    at = (row // inner).to(tl.int64) * outer_stride + (row % inner).to(tl.int64) * inner_stride
    xv = tl.load(x + at[:, None] + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
    scale = l2_scale(xv, eps, 1)
    flat = row.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(y + flat, (xv * scale[:, None]).to(y.dtype.element_ty), mask=ok)
    tl.store(r + row, scale.to(r.dtype.element_ty), mask=row < rows)


@triton.jit
def _l2_normalize_backward_kernel(d_y, y, r, d_x, rows, D: tl.constexpr, BLOCK_R: tl.constexpr,
                                  BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (row < rows)[:, None] & (cols < D)[None, :]
    flat = row.to(tl.int64)[:, None] * D + cols[None, :]
    g = tl.load(d_y + flat, mask=ok, other=0.0).to(COMPUTE)
    yv = tl.load(y + flat, mask=ok, other=0.0).to(COMPUTE)
    scale = tl.load(r + row, mask=row < rows, other=0.0).to(COMPUTE)
    dx = scale[:, None] * (g - yv * tl.sum(yv * g, axis=1)[:, None])
    tl.store(d_x + flat, dx.to(d_x.dtype.element_ty), mask=ok)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, D] without a copy where its strides allow (a head slice of packed rows
    does), else a contiguous copy."""
    rows = math.prod(x.shape[:-1])  # given, not -1: a reshape cannot infer it when D = 0
    return last_dim_contiguous(x.reshape(rows, 1, x.shape[-1]) if x.dim() < 3 else x.flatten(0, -3))


def l2_normalize_triton(x):
    """Same contract as `mom::l2_normalize`: (y contiguous in x's dtype, r [..., 1])."""
    x3 = _rows_view(x)
    outer, inner, d = x3.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r = torch.empty(*x.shape[:-1], 1, dtype=compute_dtype(x.dtype), device=x.device)
    rows = outer * inner
    if rows > 0 and d > 0:
        _l2_normalize_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            x3, y, r, rows, inner, x3.stride(0), x3.stride(1), L2_EPS, D=d, BLOCK_R=BLOCK_ROWS,
            BLOCK_D=triton.next_power_of_2(d), COMPUTE=compute_type(x.dtype),
            **pdl.launch_options(x.device))
    elif rows > 0:  # empty rows: sum 0, r = eps^-1/2
        r.fill_(L2_EPS ** -0.5)
    return y, r


def l2_normalize_backward_triton(d_y, y, r):
    """Same contract as `mom::l2_normalize_backward`: dx in d_y's dtype."""
    d_y, y, r = (t.contiguous() for t in (d_y, y, r))
    d = y.shape[-1]
    rows = y.numel() // max(d, 1)
    d_x = torch.empty_like(d_y)
    if rows > 0 and d > 0:
        _l2_normalize_backward_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            d_y, y, r, d_x, rows, D=d, BLOCK_R=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(d),
            COMPUTE=compute_type(d_y.dtype, y.dtype), **pdl.launch_options(d_y.device))
    return d_x
