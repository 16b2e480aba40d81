"""Triton CUDA kernels of `mom::gather_rows` and `mom::gather_rows_backward`.

The forward reads every row's token and set once and copies its A + C columns from the strided
projection into head and tail: one pass where indexing, masking and concatenating make three. The
backward runs over tokens: a token's k rows (row_of_choice) are summed into d_q and handed to the
sets they read, so that every element of d_q and d_per_set is written once, zeros included.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl
from .layout import last_dim_contiguous
from .triton_precision import compute_type

BLOCK_ROWS, BLOCK_COLS = 16, 256


@triton.jit
def _source(head, tail, rows, cols, A: tl.constexpr, SPLIT: tl.constexpr, C: tl.constexpr):
    """Pointers to element (rows, cols) of the virtual row head | tail (A + C columns)."""
    in_head = cols < A + SPLIT
    head_ptr = head + rows[:, None].to(tl.int64) * (A + SPLIT) + cols[None, :]
    tail_ptr = tail + rows[:, None].to(tl.int64) * (C - SPLIT) + (cols - A - SPLIT)[None, :]
    return tl.where(in_head[None, :], head_ptr, tail_ptr)


@triton.jit
def _gather_kernel(q, per_set, token, set_of_row, head, tail, r, q_stride, token_stride, set_stride,
                   A: tl.constexpr, C: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < r
    col_ok = cols < A + C
    tok = tl.load(token + rows, mask=row_ok, other=0).to(tl.int64)
    s = tl.load(set_of_row + rows, mask=row_ok, other=-1)
    set_ok = (s >= 0) & (s < S)
    is_q = cols < A
    q_ptr = q + tok[:, None] * q_stride + cols[None, :]
    set_row = tok * token_stride + s.to(tl.int64) * set_stride
    set_ptr = per_set + set_row[:, None] + (cols - A)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    value = tl.load(tl.where(is_q[None, :], q_ptr, set_ptr), mask=ok & (is_q[None, :] | set_ok[:, None]),
                    other=0.0)
    tl.store(_source(head, tail, rows, cols, A, SPLIT, C), value, mask=ok)


@triton.jit
def _gather_backward_kernel(d_head, d_tail, set_of_row, row_of_choice, d_q, d_per_set, n,
                            A: tl.constexpr, C: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr,
                            K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                            COMPUTE: tl.constexpr, PDL: tl.constexpr):
    """Per token: d_q = the sum of its rows' q columns; d_per_set[set] = the sum of the set columns
    of its rows that read that set (zeros where none did)."""
    pdl.enter(PDL)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok_ok = toks < n
    col_ok = cols < A + C
    is_q = cols < A
    ok = tok_ok[:, None] & col_ok[None, :]
    for s in tl.static_range(S):
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=COMPUTE)
        for i in tl.static_range(K):
            row = tl.load(row_of_choice + toks.to(tl.int64) * K + i, mask=tok_ok, other=0)
            row_set = tl.load(set_of_row + row, mask=tok_ok, other=-1)
            take = (is_q[None, :] & (s == 0)) | (~is_q[None, :] & (row_set == s)[:, None])
            d_row = tl.load(_source(d_head, d_tail, row, cols, A, SPLIT, C), mask=ok & take, other=0.0)
            acc += d_row.to(COMPUTE)
        if s == 0:
            tl.store(d_q + toks[:, None].to(tl.int64) * A + cols[None, :], acc.to(d_q.dtype.element_ty),
                     mask=ok & is_q[None, :])
        tl.store(d_per_set + (toks[:, None].to(tl.int64) * S + s) * C + (cols - A)[None, :],
                 acc.to(d_per_set.dtype.element_ty), mask=ok & ~is_q[None, :])


def gather_rows_triton(q, per_set, token, set_of_row, row_of_choice, split: int):
    """Same contract as `mom::gather_rows`: (head [R, A + split], tail [R, C - split]) in q's dtype;
    q and per_set are read through their strides."""
    q, per_set = last_dim_contiguous(q), last_dim_contiguous(per_set)
    token, set_of_row = token.contiguous(), set_of_row.contiguous()
    (_, a), (_, s, c), r = q.shape, per_set.shape, token.shape[0]
    head = q.new_empty(r, a + split)
    tail = q.new_empty(r, c - split)
    if r > 0 and a + c > 0:
        grid = (triton.cdiv(r, BLOCK_ROWS), triton.cdiv(a + c, BLOCK_COLS))
        _gather_kernel[grid](q, per_set, token, set_of_row, head, tail, r, q.stride(0), per_set.stride(0),
                             per_set.stride(1), A=a, C=c, S=s, SPLIT=split, BLOCK_R=BLOCK_ROWS,
                             BLOCK_C=BLOCK_COLS, **pdl.launch_options(q.device))
    return head, tail


def gather_rows_backward_triton(d_head, d_tail, token, set_of_row, row_of_choice, n_sets: int, split: int):
    """Same contract as `mom::gather_rows_backward`: (d_q [N, A], d_per_set [N, S, C])."""
    d_head, d_tail, set_of_row, row_of_choice = (
        t.contiguous() for t in (d_head, d_tail, set_of_row, row_of_choice))
    n, k = row_of_choice.shape
    a, c = d_head.shape[1] - split, split + d_tail.shape[1]
    d_q = d_head.new_empty(n, a)
    d_per_set = d_head.new_empty(n, n_sets, c)
    if n > 0 and a + c > 0:
        grid = (triton.cdiv(n, BLOCK_ROWS), triton.cdiv(a + c, BLOCK_COLS))
        _gather_backward_kernel[grid](d_head, d_tail, set_of_row, row_of_choice, d_q, d_per_set, n, A=a, C=c,
                                      S=n_sets, SPLIT=split, K=k, BLOCK_T=BLOCK_ROWS, BLOCK_C=BLOCK_COLS,
                                      COMPUTE=compute_type(d_head.dtype), **pdl.launch_options(d_head.device))
    return d_q, d_per_set
