"""Triton CUDA kernels of `mom::combine` and `mom::combine_backward`.

The reference gathers each token's k rows into a [B, T, k, H, V] tensor in the weights' dtype and
then weights and sums it: several passes over memory, each k times the size of the output. Here
one program per token reads its k rows once and writes its output row once; the backward likewise
writes each row's gradient once (row_of_choice is a permutation, so no two tokens write the same
row) and sums o_row . d_y for the weight gradients in the same pass.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .triton_precision import compute_type

BLOCK = 1024  # columns (H*V) per step


@triton.jit
def _combine_kernel(o_rows, weights, row_of_choice, y, HV: tl.constexpr, K: tl.constexpr,
                    BLOCK: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr):
    """y[token] = sum_i weights[token, i] * o_rows[row_of_choice[token, i]], one (token, column
    block) per program."""
    pdl.enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HV
    acc = tl.zeros((BLOCK,), dtype=COMPUTE)
    for i in tl.static_range(K):
        row = tl.load(row_of_choice + token * K + i).to(tl.int64)
        weight = tl.load(weights + token * K + i).to(COMPUTE)
        acc += weight * tl.load(o_rows + row * HV + cols, mask=ok, other=0.0).to(COMPUTE)
    tl.store(y + token * HV + cols, acc.to(y.dtype.element_ty), mask=ok)


@triton.jit
def _combine_backward_kernel(d_y, o_rows, weights, row_of_choice, d_rows, d_weights, HV: tl.constexpr,
                             K: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr):
    """Per token: d_rows[row_i] = weights[i] * d_y, d_weights[i] = o_rows[row_i] . d_y, over all
    H*V columns (the weight gradient is a full-row sum, so one program owns the row)."""
    pdl.enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    for i in tl.static_range(K):
        row = tl.load(row_of_choice + token * K + i).to(tl.int64)
        weight = tl.load(weights + token * K + i).to(COMPUTE)
        dot = tl.zeros((BLOCK,), dtype=COMPUTE)
        for c0 in range(0, HV, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < HV
            dy = tl.load(d_y + token * HV + cols, mask=ok, other=0.0).to(COMPUTE)
            dot += tl.load(o_rows + row * HV + cols, mask=ok, other=0.0).to(COMPUTE) * dy
            tl.store(d_rows + row * HV + cols, (weight * dy).to(d_rows.dtype.element_ty), mask=ok)
        tl.store(d_weights + token * K + i, tl.sum(dot, axis=0).to(d_weights.dtype.element_ty))


def _block(hv: int) -> int:
    return min(BLOCK, triton.next_power_of_2(max(hv, 16)))


def combine_triton(o_rows, weights, row_of_choice):
    """Same contract as `mom::combine`: y [B, T, H, V] in the weights' dtype."""
    o_rows, weights, row_of_choice = (t.contiguous() for t in (o_rows, weights, row_of_choice))
    b, t, k = row_of_choice.shape
    hv = math.prod(o_rows.shape[1:])
    y = torch.empty(b, t, *o_rows.shape[1:], dtype=weights.dtype, device=o_rows.device)
    if b * t > 0 and hv > 0:
        block = _block(hv)
        _combine_kernel[(b * t, triton.cdiv(hv, block))](
            o_rows, weights, row_of_choice, y, HV=hv, K=k, BLOCK=block, COMPUTE=compute_type(weights.dtype),
            **pdl.launch_options(y.device))
    return y


def combine_backward_triton(d_y, o_rows, weights, row_of_choice):
    """Same contract as `mom::combine_backward`: (d_rows in o_rows' dtype, d_weights in d_y's)."""
    d_y, o_rows, weights, row_of_choice = (t.contiguous() for t in (d_y, o_rows, weights, row_of_choice))
    b, t, k = row_of_choice.shape
    hv = math.prod(o_rows.shape[1:])
    # row_of_choice is a permutation of o_rows' rows (combine's contract, as dispatch returns it),
    # so the kernel writes every row of d_rows and every weight gradient: no zero-fill first
    d_rows = torch.empty_like(o_rows)
    d_weights = torch.empty(b, t, k, dtype=d_y.dtype, device=d_y.device)
    if hv == 0:  # empty rows: each weight's gradient is an empty sum
        return d_rows, d_weights.zero_()
    if b * t > 0:
        _combine_backward_kernel[(b * t,)](
            d_y, o_rows, weights, row_of_choice, d_rows, d_weights, HV=hv, K=k, BLOCK=_block(hv),
            COMPUTE=compute_type(d_y.dtype, weights.dtype), **pdl.launch_options(d_y.device))
    return d_rows, d_weights
