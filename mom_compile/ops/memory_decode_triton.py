"""Triton CUDA kernel of `mom::memory_decode`: a decode row's conv, normalisation and state step in
one launch.

One program owns one (row, head, V-block): it recomputes the head's q and k conv outputs (K
channels each, cheap next to the [K, BLOCK_V] state slice it streams), normalises them and steps
its slice of the state, which it loads first so that the load overlaps the conv. Programs share
nothing, so a step is one dependent chain of loads deep (latency, not bandwidth, bounds decode).
The q/k conv histories are written by the V-block-0 program only; each V-block writes its own v
channels.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gated_delta_step_triton import block_sizes
from .memory_decode import L2_EPS
from .triton_precision import compute_type, split_scale


@triton.jit
def _conv_channels(conv_in, conv_w, conv_b, conv_states, conv_new, row, src, ch, ok, write,
                   C: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """silu(conv) of channels `ch` of one row, whose history is conv_states[src]; writes the
    shifted history to conv_new[row] where `write`."""
    x = tl.load(conv_in + row * C + ch, mask=ok, other=0.0)
    z = tl.load(conv_w + ch * W + (W - 1), mask=ok, other=0.0).to(COMPUTE) * x.to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(conv_b + ch, mask=ok, other=0.0).to(COMPUTE)
    for i in tl.static_range(W - 1):
        past = tl.load(conv_states + (src * (W - 1) + i) * C + ch, mask=ok, other=0.0)
        z += tl.load(conv_w + ch * W + i, mask=ok, other=0.0).to(COMPUTE) * past.to(COMPUTE)
        if i > 0:
            tl.store(conv_new + (row * (W - 1) + i - 1) * C + ch, past, mask=ok & write)
    tl.store(conv_new + (row * (W - 1) + W - 2) * C + ch, x, mask=ok & write)
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _l2_normalize(x, eps):
    return x / tl.sqrt(tl.sum(x * x, axis=0) + eps)


@triton.jit
def _decode_kernel(
    conv_in, beta, g, slot, conv_w, conv_b, conv_states, rec_states, o, conv_new, rec_new,
    scale_hi, scale_lo, eps,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    v_block = tl.program_id(2)
    C: tl.constexpr = 2 * H * K + H * V
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)  # exact in float64 (see split_scale)
    kk = tl.arange(0, BLOCK_K)
    col = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = kk < K
    v_ok = col < V
    tile_ok = k_ok[:, None] & v_ok[None, :]
    src = tl.load(slot + row)
    s = tl.load(rec_states + (src * H + h) * K * V + kk[:, None] * V + col[None, :], mask=tile_ok, other=0.0)

    first = v_block == 0
    q = _conv_channels(conv_in, conv_w, conv_b, conv_states, conv_new, row, src, h * K + kk, k_ok,
                       first, C, W, HAS_BIAS, COMPUTE)
    k = _conv_channels(conv_in, conv_w, conv_b, conv_states, conv_new, row, src, H * K + h * K + kk,
                       k_ok, first, C, W, HAS_BIAS, COMPUTE)
    v = _conv_channels(conv_in, conv_w, conv_b, conv_states, conv_new, row, src,
                       2 * H * K + h * V + col, v_ok, v_ok, C, W, HAS_BIAS, COMPUTE)
    q = _l2_normalize(q, eps)
    k = _l2_normalize(k, eps)

    rh = row * H + h
    s = s.to(COMPUTE) * tl.exp(tl.load(g + rh).to(COMPUTE))
    u = tl.load(beta + rh).to(COMPUTE) * (v - tl.sum(s * k[:, None], axis=0))
    s = s + k[:, None] * u[None, :]
    out = scale * tl.sum(s * q[:, None], axis=0)
    tl.store(rec_new + rh.to(tl.int64) * K * V + kk[:, None] * V + col[None, :], s, mask=tile_ok)
    tl.store(o + rh * V + col, out, mask=v_ok)


def memory_decode_triton(conv_in, beta, g, slot, conv_weight, conv_bias, conv_states, rec_states, scale):
    """Same contract as `decode_reference`, computing in the states' dtype throughout, without the
    reference's intermediate rounding to the input dtype."""
    conv_in, beta, g, slot, conv_weight, conv_states, rec_states = (
        t.contiguous() for t in (conv_in, beta, g, slot, conv_weight, conv_states, rec_states))
    rows = conv_in.shape[0]
    _, h, dk, dv = rec_states.shape
    o = rec_states.new_empty(rows, h, dv)
    conv_new = conv_states.new_empty(rows, *conv_states.shape[1:])
    rec_new = rec_states.new_empty(rows, h, dk, dv)
    if rows * h == 0 or dk * dv == 0:
        return o.zero_(), conv_new.copy_(conv_states[slot]), rec_new.copy_(rec_states[slot])
    block_k, widest = block_sizes(dk, dv)
    # about 512 programs: a decode step's few state slices must spread over the whole GPU
    block_v = max(8, min(widest, triton.next_power_of_2(max(1, rows * h * dv // 512))))
    bias = conv_weight if conv_bias is None else conv_bias.contiguous()  # placeholder if absent
    _decode_kernel[(rows, h, triton.cdiv(dv, block_v))](
        conv_in, beta, g, slot, conv_weight, bias, conv_states, rec_states, o, conv_new, rec_new,
        *split_scale(scale), L2_EPS, H=h, K=dk, V=dv, W=conv_weight.shape[1], BLOCK_K=block_k,
        BLOCK_V=block_v, HAS_BIAS=conv_bias is not None, COMPUTE=compute_type(rec_states.dtype),
        num_warps=8 if block_k * block_v >= 4096 else 4)
    return o, conv_new, rec_new
