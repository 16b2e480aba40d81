"""Triton CUDA kernels of `mom::memory_decode_` (ops/table.py registers them): a decode step in two
launches, states in place.

1. `_decode_conv_kernel`, one program per (row, head): reads the row's projections straight from
   the layer's projection output (no gathered copy), computes beta and g, the head's q|k|v conv
   (shifting its conv history by one token: every channel's history belongs to one program), the
   L2 norms, and writes the conv outputs, beta and g to a small scratch buffer.
2. `_decode_step_kernel`, one program per (row, head, V-block): one gated delta step of its slice
   of the row's state.
Two launches because the q and k conv outputs feed every V-block of a head: a single launch would
have the program that rewrites a q/k history race the programs still reading it.
Each kernel reads the state tables through one pointer (`*_src`) and writes them through another
(`*_dst`), read-only inputs first and written outputs last (TensorRT's argument order, see
export/tensorrt_plugin.py); the in-place op passes the same table as both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .gated_delta_step_triton import block_sizes
from .l2_normalize import L2_EPS
from .l2_normalize_triton import l2_scale
from .launch import launch
from .layout import last_dim_contiguous, next_power_of_2
from .memory_decode import SOFTPLUS_THRESHOLD as _SOFTPLUS_THRESHOLD
from .memory_decode import check_tables_contiguous
from .precision import compute_dtype
from .triton_precision import compute_type, split_scale

SOFTPLUS_THRESHOLD = tl.constexpr(_SOFTPLUS_THRESHOLD)  # a kernel reads globals as constexprs


@triton.jit
def _decode_conv_kernel(
    q, per_set, memory_idx, a_log, dt_bias, conv_w, conv_b, conv_src, eps,
    q_stride, set_stride_b, set_stride_s, slots,
    conv_dst, qkv, beta_g,
    CHOICES: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    SINGLE_SET: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    memory = tl.load(memory_idx + row)
    if memory < 0:  # a padding token: the step kernel writes o = 0 and reads nothing of this
        return
    b = row // CHOICES
    proj = per_set + b * set_stride_b
    if not SINGLE_SET:
        proj += memory * set_stride_s
    C: tl.constexpr = 2 * H * K + H * V
    hist = (b * slots + memory) * (W - 1) * C
    src, dst = conv_src + hist, conv_dst + hist

    # every load first: a chain of dependent round trips to memory is what a decode step waits on
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    vv = tl.arange(0, BLOCK_V)
    v_ok = vv < V
    q_ch, k_ch, v_ch = h * K + kk, H * K + h * K + kk, 2 * H * K + h * V + vv
    q_x, q_past = _conv_inputs(q + b * q_stride + h * K, kk, q_ch, k_ok, src, C, W, BLOCK_W)
    k_x, k_past = _conv_inputs(proj + h * K, kk, k_ch, k_ok, src, C, W, BLOCK_W)
    v_x, v_past = _conv_inputs(proj + H * K + h * V, vv, v_ch, v_ok, src, C, W, BLOCK_W)
    b_pre = tl.load(proj + H * K + H * V + h).to(COMPUTE)
    a = tl.load(proj + H * K + H * V + H + h).to(COMPUTE) + tl.load(dt_bias + h).to(COMPUTE)

    out = qkv + (row * H + h) * (2 * K + V)
    qc = _conv_silu(q_x, q_past, q_ch, k_ok, conv_w, conv_b, W, BLOCK_W, HAS_BIAS, COMPUTE)
    kc = _conv_silu(k_x, k_past, k_ch, k_ok, conv_w, conv_b, W, BLOCK_W, HAS_BIAS, COMPUTE)
    vc = _conv_silu(v_x, v_past, v_ch, v_ok, conv_w, conv_b, W, BLOCK_W, HAS_BIAS, COMPUTE)
    tl.store(out + kk, qc * l2_scale(qc, eps, 0), mask=k_ok)
    tl.store(out + K + kk, kc * l2_scale(kc, eps, 0), mask=k_ok)
    tl.store(out + 2 * K + vv, vc, mask=v_ok)
    # beta = sigmoid(b_pre), rounded to the input dtype as the scan path holds it; g in COMPUTE
    beta = (1.0 / (1.0 + tl.exp(-b_pre))).to(q.dtype.element_ty).to(COMPUTE)
    softplus = tl.where(a > SOFTPLUS_THRESHOLD, a, tl.log(1.0 + tl.exp(tl.minimum(a, SOFTPLUS_THRESHOLD))))
    g = -tl.exp(tl.load(a_log + h).to(COMPUTE)) * softplus
    tl.store(beta_g + (row * H + h) * 2, beta)
    tl.store(beta_g + (row * H + h) * 2 + 1, g)

    # dst may be src, and a history row is stored by another thread than the one that loaded it:
    # every thread's loads are done before any thread stores
    tl.debug_barrier()
    _shift_history(q_x, q_past, q_ch, k_ok, dst, C, W, BLOCK_W)
    _shift_history(k_x, k_past, k_ch, k_ok, dst, C, W, BLOCK_W)
    _shift_history(v_x, v_past, v_ch, v_ok, dst, C, W, BLOCK_W)


@triton.jit
def _conv_inputs(x_ptr, n, ch, ok, src, C: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr):
    """This token's inputs of channels ch (at x_ptr + n) and their W - 1 history rows
    [BLOCK_W, channels] (src + i * C, oldest first; padding rows 0)."""
    i = tl.arange(0, BLOCK_W)[:, None]
    x = tl.load(x_ptr + n, mask=ok, other=0.0)
    past = tl.load(src + i * C + ch[None, :], mask=(i < W - 1) & ok[None, :], other=0.0)
    return x, past


@triton.jit
def _conv_silu(x, past, ch, ok, conv_w, conv_b, W: tl.constexpr, BLOCK_W: tl.constexpr,
               HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """silu of the causal conv of channels ch at this token: taps 0..W-2 on the history rows, tap
    W-1 on x."""
    i = tl.arange(0, BLOCK_W)[:, None]
    taps = tl.load(conv_w + ch[None, :] * W + i, mask=(i < W - 1) & ok[None, :], other=0.0)
    z = tl.sum(taps.to(COMPUTE) * past.to(COMPUTE), axis=0)
    z += tl.load(conv_w + ch * W + (W - 1), mask=ok, other=0.0).to(COMPUTE) * x.to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(conv_b + ch, mask=ok, other=0.0).to(COMPUTE)
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _shift_history(x, past, ch, ok, dst, C: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr):
    """The history advanced by one token: row i - 1 <- row i, and x becomes the newest row W - 2."""
    i = tl.arange(0, BLOCK_W)[:, None]
    tl.store(dst + (i - 1) * C + ch[None, :], past, mask=(i >= 1) & (i < W - 1) & ok[None, :])
    tl.store(dst + (W - 2) * C + ch, x, mask=ok)


@triton.jit
def _decode_step_kernel(
    memory_idx, qkv, beta_g, rec_src, scale_hi, scale_lo, slots, rec_dst, o,
    CHOICES: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    col = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = col < V
    rh = row * H + h
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    # the conv kernel, always the one ahead, writes neither the indices nor the states: they load
    # while it runs (pdl.py), the state tile being the step's one long wait for memory
    memory = tl.load(memory_idx + row)
    tile_ok = k_ok[:, None] & v_ok[None, :] & (memory >= 0)
    tile = (((row // CHOICES) * slots + memory) * H + h) * K * V + kk[:, None] * V + col[None, :]
    s = tl.load(rec_src + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    pdl.enter(PDL)
    if memory < 0:
        tl.store(o + rh * V + col, tl.zeros((BLOCK_V,), dtype=o.dtype.element_ty), mask=v_ok)
        return
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)  # exact in float64 (see split_scale)
    vec = qkv + rh * (2 * K + V)
    q = tl.load(vec + kk, mask=k_ok, other=0.0)
    k = tl.load(vec + K + kk, mask=k_ok, other=0.0)
    v = tl.load(vec + 2 * K + col, mask=v_ok, other=0.0)
    beta = tl.load(beta_g + rh * 2)
    g = tl.load(beta_g + rh * 2 + 1)

    s = s * tl.exp(g)
    u = beta * (v - tl.sum(s * k[:, None], axis=0))
    s = s + k[:, None] * u[None, :]
    tl.store(rec_dst + tile, s.to(rec_dst.dtype.element_ty), mask=tile_ok)
    tl.store(o + rh * V + col, (scale * tl.sum(s * q[:, None], axis=0)).to(o.dtype.element_ty), mask=v_ok)


@dataclass(frozen=True)
class DecodeLaunch:
    """Grids, tile sizes and warps of the two kernels for `rows` rows (one launcher, and the
    TensorRT plugin, read them from here)."""

    conv_grid: tuple[int, int]
    step_grid: tuple[int, int, int]
    block_k: int
    block_v_conv: int  # the conv kernel holds a head's whole V
    block_v: int       # the step kernel's V-block
    conv_warps: int
    step_warps: int


def step_block_sizes(dk: int, dv: int) -> tuple[int, int]:
    """(BLOCK_K, the widest V-block) of the step kernel: tiles of up to 16K fp32 states, 64 registers
    a thread on 8 warps (the widest was fastest at batch 64: benchmarks/RESULTS.md#why-these-defaults)."""
    return block_sizes(dk, dv, states=16384)


@functools.lru_cache(maxsize=256)  # an eager decode step, bound by the host, asks once a layer
def decode_launch(rows: int, h: int, dk: int, dv: int, block_v: int | None = None,
                  step_warps: int | None = None) -> DecodeLaunch:
    """By default about 512 step programs: a decode step's few state slices must spread over the
    whole GPU; `block_v` and `step_warps` force the step kernel's V-block and warps (by default 64
    states a thread: 4 warps up to 8K states, 8 above)."""
    block_k, widest = step_block_sizes(dk, dv)
    if block_v is None:
        block_v = max(8, min(widest, triton.next_power_of_2(max(1, rows * h * dv // 512))))
    if step_warps is None:
        step_warps = 8 if block_k * block_v > 8192 else 4
    return DecodeLaunch(conv_grid=(rows, h), step_grid=(rows, h, triton.cdiv(dv, block_v)), block_k=block_k,
                        block_v_conv=triton.next_power_of_2(dv), block_v=block_v, conv_warps=4,
                        step_warps=step_warps)


def history_block(width: int) -> int:
    """The conv kernel's BLOCK_W: a conv of width W keeps W - 1 history rows, padded to a power of two."""
    return next_power_of_2(width - 1)


def memory_decode_triton_(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias,  # noqa: N803
                          conv_states, rec_states, scale, single_set, config: dict | None = None):
    """Same contract as `decode_reference_`, computing in the states' dtype throughout, without the
    reference's intermediate rounding to the input dtype. q and per_set are read through their
    strides (the layer passes views of its projection output). config: `decode_launch`'s
    block_v and step_warps."""
    q, per_set = last_dim_contiguous(q), last_dim_contiguous(per_set)
    memory_idx, A_log, dt_bias, conv_weight = (
        t.contiguous() for t in (memory_idx, A_log, dt_bias, conv_weight))
    check_tables_contiguous(conv_states, rec_states)
    b, chosen = memory_idx.shape
    _, slots, h, dk, dv = rec_states.shape
    rows = b * chosen
    o = rec_states.new_empty(b, chosen, h, dv)
    if rows * h == 0 or dk * dv == 0:
        return o.zero_()
    compute = compute_type(rec_states.dtype)
    scratch_dtype = compute_dtype(rec_states.dtype)
    qkv = torch.empty(rows, h, 2 * dk + dv, dtype=scratch_dtype, device=q.device)
    beta_g = torch.empty(rows, h, 2, dtype=scratch_dtype, device=q.device)
    width = conv_weight.shape[1]
    plan = decode_launch(rows, h, dk, dv, **(config or {}))
    overlap = pdl.launch_options(q.device)
    bias = conv_weight if conv_bias is None else conv_bias.contiguous()  # placeholder if absent
    launch(
        _decode_conv_kernel, plan.conv_grid,
        q, per_set, memory_idx, A_log, dt_bias, conv_weight, bias, conv_states, L2_EPS,
        q.stride(0), per_set.stride(0), per_set.stride(1), slots, conv_states, qkv, beta_g,
        CHOICES=chosen, H=h, K=dk, V=dv, W=width, BLOCK_K=plan.block_k, BLOCK_V=plan.block_v_conv,
        BLOCK_W=history_block(width), HAS_BIAS=conv_bias is not None, SINGLE_SET=single_set, COMPUTE=compute,
        **overlap, num_warps=plan.conv_warps)
    launch(
        _decode_step_kernel, plan.step_grid,
        memory_idx, qkv, beta_g, rec_states, *split_scale(scale), slots, rec_states, o,
        CHOICES=chosen, H=h, K=dk, V=dv, BLOCK_K=plan.block_k, BLOCK_V=plan.block_v, COMPUTE=compute,
        **overlap, num_warps=plan.step_warps)
    return o

