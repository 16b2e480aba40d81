"""Triton CUDA kernel of `mom::route`: one launch for what the formula does in a dozen.

Each program takes a block of tokens, ranks each token's logits by pairwise comparison (as the
formula does: NaN as -inf, ties to the lower index), and writes the chosen indices and the softmax
of the chosen logits (NaN logits stay NaN, as in the formula), then the shared memory's column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .launch import launch
from .layout import last_dim_contiguous, next_power_of_2
from .precision import compute_dtype
from .triton_precision import compute_type

PAIRS = 4096  # token x memory x memory comparisons per program


@triton.jit
def _route_kernel(logits, memory_idx, weights, n, row_stride, M: tl.constexpr, TOPK: tl.constexpr,
                  SHARED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
                  PDL: tl.constexpr):
    pdl.enter(PDL)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mems = tl.arange(0, BLOCK_M)
    tok_ok = toks < n
    z = tl.load(logits + toks[:, None].to(tl.int64) * row_stride + mems[None, :],
                mask=tok_ok[:, None] & (mems < M)[None, :], other=float("-inf")).to(COMPUTE)
    # columns past M read -inf and have the largest indices: they never rank among the first M
    key = tl.where(z == z, z, float("-inf"))
    k_i, k_j = key[:, :, None], key[:, None, :]
    beats = (k_j > k_i) | ((k_j == k_i) & (mems[None, None, :] < mems[None, :, None]))
    rank = tl.sum(beats.to(tl.int32), axis=2)  # [tokens, memories]: how many come before each
    chosen = rank < TOPK
    top = tl.max(tl.where(chosen, key, float("-inf")), axis=1)
    e = tl.where(chosen, tl.exp(z - top[:, None]), 0.0)
    w = e / tl.sum(e, axis=1)[:, None]
    out = toks.to(tl.int64) * (TOPK + SHARED)
    for i in tl.static_range(TOPK):
        slot = rank == i
        tl.store(memory_idx + out + i, tl.sum(tl.where(slot, mems[None, :], 0), axis=1).to(tl.int64),
                 mask=tok_ok)
        tl.store(weights + out + i, tl.sum(tl.where(slot, w, 0.0), axis=1), mask=tok_ok)
    if SHARED:
        tl.store(memory_idx + out + TOPK, tl.zeros_like(toks).to(tl.int64) + M, mask=tok_ok)
        tl.store(weights + out + TOPK, tl.zeros((BLOCK_T,), dtype=COMPUTE) + 1.0, mask=tok_ok)


def route_triton(logits, topk: int, shared: bool):
    """Same contract as `mom::route`: (memory_idx [..., k'] int64, weights [..., k'] in the
    compute dtype); logits are read through their row stride."""
    lead, m = logits.shape[:-1], logits.shape[-1]
    x = last_dim_contiguous(logits).reshape(-1, m)
    n, k = x.shape[0], topk + int(shared)
    memory_idx = torch.empty(*lead, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(*lead, k, dtype=compute_dtype(logits.dtype), device=logits.device)
    if n > 0:
        block_m = next_power_of_2(m)
        block_t = max(1, min(128, PAIRS // (block_m * block_m)))
        launch(
            _route_kernel, ((n + block_t - 1) // block_t,),
            x, memory_idx, weights, n, x.stride(0), M=m, TOPK=topk, SHARED=bool(shared), BLOCK_T=block_t,
            BLOCK_M=block_m, COMPUTE=compute_type(logits.dtype),
            **pdl.launch_options(x.device))
    return memory_idx, weights
