"""Triton CUDA kernel of `mom::gated_delta_step`: one token of the gated delta rule per row.

One program owns one (row, head, V-block): it reads that [K, BLOCK_V] slice of the state once,
applies decay, delta correction and write-back in registers, and writes the slice and the matching
slice of the output. Every V column of the state evolves independently given k, so V-blocks need
no communication; K is kept whole because u = beta (v - S^T k) reduces over it.
The gradient stays the reference formula (`step_backward_reference`): decode never differentiates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .triton_precision import compute_type, split_scale


@triton.jit
def _step_kernel(
    q, k, v, g, beta, state, o, new_state, scale_hi, scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    COMPUTE: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    r = tl.program_id(0)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)  # exact in float64 (see split_scale)
    h = tl.program_id(1)
    col = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    v_ok = col < V
    rh = r * H + h  # int32 suffices: rows * heads is far below 2^31
    tile = rh.to(tl.int64) * K * V + kk[:, None] * V + col[None, :]
    tile_ok = k_ok[:, None] & v_ok[None, :]

    s = tl.load(state + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    k_vec = tl.load(k + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
    q_vec = tl.load(q + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
    v_vec = tl.load(v + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
    decay = tl.exp(tl.load(g + rh).to(COMPUTE))
    b = tl.load(beta + rh).to(COMPUTE)

    s = s * decay
    u = b * (v_vec - tl.sum(s * k_vec[:, None], axis=0))
    s = s + k_vec[:, None] * u[None, :]
    out = scale * tl.sum(s * q_vec[:, None], axis=0)

    tl.store(new_state + tile, s, mask=tile_ok)
    tl.store(o + rh * V + col, out.to(o.dtype.element_ty), mask=v_ok)


def block_sizes(dk: int, dv: int, states: int = 8192) -> tuple[int, int]:
    """Whole K, and a V-block keeping the fp32 state tile at <= `states` elements (8K: 32 registers a
    thread at 8 warps): enough programs to fill the GPU at decode's small row counts."""
    block_k = triton.next_power_of_2(dk)
    block_v = max(1, min(triton.next_power_of_2(dv), states // block_k))
    return block_k, block_v


def gated_delta_step_triton(q, k, v, g, beta, state, scale):
    """Same contract as `step_reference`: computes in the state's dtype (float32, or float64 for
    checks to rounding); returns (o in v's dtype, new state)."""
    q, k, v, g, beta, state = (t.contiguous() for t in (q, k, v, g, beta, state))
    r, h, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty_like(v)
    new_state = torch.empty_like(state)
    if r * h == 0 or dk * dv == 0:
        return o.zero_(), new_state.copy_(state)
    block_k, block_v = block_sizes(dk, dv)
    grid = (r, h, triton.cdiv(dv, block_v))
    _step_kernel[grid](q, k, v, g, beta, state, o, new_state, *split_scale(scale),
                       H=h, K=dk, V=dv, BLOCK_K=block_k, BLOCK_V=block_v, COMPUTE=compute_type(state.dtype),
                       **pdl.launch_options(state.device), num_warps=8 if block_k >= 128 else 4)
    return o, new_state
