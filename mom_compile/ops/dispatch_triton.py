"""Triton CUDA kernel of `mom::dispatch` (ops/table.py registers it): the reference's counting sort
in three launches where the reference runs about twenty (a batch-1 prefill is bound by launches).

A choice (b, t, i) has a category: its memory m in [0, M), or M for padding (a masked token, or a
memory out of range). Each sequence's n = T*k choices are cut into blocks of BLOCK.
1. `_count_kernel`, a program per (sequence, block): the block's count of each category,
   counts[b, category, block].
2. `_first_row_kernel`, one program: a running sum over the counts in the order the rows are laid
   out (segment (b, m) block by block, segments in (b, m) order, then the padding of every sequence
   block by block) gives each (sequence, category, block) its first row, and the segment offsets.
3. `_place_kernel`, a program per (sequence, block): a choice's row is its block's first row of its
   category plus the number of earlier choices of that category in the block (time order); the
   row's token and memory are stored there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .dispatch import dispatch_reference

SCAN_TILE = 256  # counts summed per step of the running sum (benchmarks/RESULTS.md#why-these-defaults)
MAX_BLOCKS = 256  # (sequence, block) pairs the block size aims for: fewer make each program's
                  # one-hot scan longer, more the running sum's (benchmarks/RESULTS.md#why-these-defaults)


@triton.jit
def _categories(memory_idx, mask, b, j, n, t, M, K: tl.constexpr):
    """(memory as loaded, category) of choices j of sequence b; category -1 past its n choices."""
    inside = j < n
    memory = tl.load(memory_idx + b * n + j, mask=inside, other=-1)
    real = tl.load(mask + b * t + j // K, mask=inside, other=0) != 0
    valid = real & (memory >= 0) & (memory < M)
    return memory, tl.where(inside, tl.where(valid, memory, M), -1)


@triton.jit
def _count_kernel(memory_idx, mask, counts, n, t, M, K: tl.constexpr, BLOCK: tl.constexpr,
                  CATS: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    block, blocks = tl.program_id(1), tl.num_programs(1)
    _, cat = _categories(memory_idx, mask, b, block * BLOCK + tl.arange(0, BLOCK), n, t, M, K)
    c = tl.arange(0, CATS)
    count = tl.sum((cat[:, None] == c[None, :]).to(tl.int32), axis=0)
    tl.store(counts + (b * (M + 1) + c) * blocks + block, count, mask=c <= M)


@triton.jit
def _running_sum(counts, first_row, at, ok, carry):
    """first_row[at] = carry + the counts before each entry of this tile; returns the new carry."""
    c = tl.load(counts + at, mask=ok, other=0)
    first = carry + (tl.cumsum(c, axis=0) - c).to(tl.int64)
    tl.store(first_row + at, first, mask=ok)
    return first, carry + tl.sum(c, axis=0).to(tl.int64)


@triton.jit
def _first_row_kernel(counts, first_row, offsets, B, M, blocks, TILE: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    carry = tl.sum(tl.zeros([TILE], dtype=tl.int64), axis=0)
    real = B * M * blocks  # entries (b, m, block) of the segments, in row order
    for start in range(0, real, TILE):
        i = start + tl.arange(0, TILE).to(tl.int64)
        ok = i < real
        at = (i // (M * blocks)) * (M + 1) * blocks + i % (M * blocks)
        first, carry = _running_sum(counts, first_row, at, ok, carry)
        tl.store(offsets + i // blocks, first, mask=ok & (i % blocks == 0))  # segment b*M + m starts
    tl.store(offsets + B * M, carry)
    for start in range(0, B * blocks, TILE):  # then the padding of every sequence
        i = start + tl.arange(0, TILE).to(tl.int64)
        ok = i < B * blocks
        at = ((i // blocks) * (M + 1) + M) * blocks + i % blocks
        _, carry = _running_sum(counts, first_row, at, ok, carry)


@triton.jit
def _place_kernel(memory_idx, mask, first_row, token_of_row, memory_of_row, row_of_choice, n, t, M,
                  K: tl.constexpr, BLOCK: tl.constexpr, CATS: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    block, blocks = tl.program_id(1), tl.num_programs(1)
    j = block * BLOCK + tl.arange(0, BLOCK)
    inside = j < n
    memory, cat = _categories(memory_idx, mask, b, j, n, t, M, K)
    hot = (cat[:, None] == tl.arange(0, CATS)[None, :]).to(tl.int32)
    before = tl.sum((tl.cumsum(hot, axis=0) - hot) * hot, axis=1)  # earlier choices of its category
    first = tl.load(first_row + (b * (M + 1) + cat) * blocks + block, mask=inside, other=0)
    row = first + before
    tl.store(row_of_choice + b * n + j, row, mask=inside)
    tl.store(token_of_row + row, b * t + j // K, mask=inside)
    tl.store(memory_of_row + row, tl.minimum(tl.maximum(memory, 0), M - 1).to(tl.int64), mask=inside)


def block_size(b: int, n: int, cats: int) -> int:
    """Choices a program: the smallest power of two from 64 that cuts b sequences of n choices into
    at most MAX_BLOCKS blocks, within the cap that keeps a [BLOCK, cats] one-hot tile at 8192 entries."""
    cap = max(16, min(1024, 8192 // cats))
    block = min(64, cap)
    while block < cap and b * triton.cdiv(n, block) > MAX_BLOCKS:
        block *= 2
    return block


def dispatch_triton(
    memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `mom::dispatch` (`dispatch.py`)."""
    b, t, k = memory_idx.shape
    n, m = t * k, num_memories
    if b * n == 0:
        return dispatch_reference(memory_idx, mask, num_memories)
    cats = triton.next_power_of_2(m + 1)
    block = block_size(b, n, cats)
    grid = (b, triton.cdiv(n, block))
    idx, valid = memory_idx.contiguous(), mask.contiguous().view(torch.uint8)
    new = idx.new_empty
    counts, first_row = new(b, m + 1, grid[1], dtype=torch.int32), new(b, m + 1, grid[1])
    token_of_row, memory_of_row, row_of_choice, offsets = new(b * n), new(b * n), new(b, t, k), new(b * m + 1)
    launch = pdl.launch_options(idx.device)
    _count_kernel[grid](idx, valid, counts, n, t, m, K=k, BLOCK=block, CATS=cats, **launch)
    _first_row_kernel[(1,)](counts, first_row, offsets, b, m, grid[1], TILE=SCAN_TILE, **launch)
    _place_kernel[grid](idx, valid, first_row, token_of_row, memory_of_row, row_of_choice, n, t, m,
                        K=k, BLOCK=block, CATS=cats, **launch)
    return token_of_row, memory_of_row, row_of_choice, offsets
