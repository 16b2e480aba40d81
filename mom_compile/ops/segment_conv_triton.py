"""Triton CUDA kernels of `mom::segment_conv` and `mom::segment_conv_backward`.

The reference builds a gather table [x ; history ; 0] and index tensors; here `_row_table_kernel`
finds each row's segment and position once, by a binary search over the offsets (no host sync,
grid from shapes only), and the conv kernels read them from that table (two loads where a search
is a chain of dependent ones) and every tap straight from x or from the segment's history.

Backward, in two launches:
1. `_dz_kernel`: recompute z and store d_z = d_y * silu'(z) in x's dtype;
2. `_dx_kernel`: one pass over the "table rows" (the N rows of x, then the W-1 history rows of
   every segment), each collecting the d_z of the outputs that tapped it and the d_final entry that
   copied it. Both kinds of row have a position in their segment (history rows: -(W-1)..-1), so one
   formula serves dx and d_initial_state. The d_z an input row meets at each tap, times the row, is
   that tap's share of d_weight, so the same loads give each program's partial sums of d_weight
   and d_bias (summed afterwards by torch: a fixed-size reduction, deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .precision import compute_dtype
from .segment_of_triton import segment_of
from .triton_precision import compute_type


@triton.jit
def _tap(x, init, rows, seg, pos, back, cols, row_ok, col_ok, D: tl.constexpr, W: tl.constexpr,
         COMPUTE: tl.constexpr):
    """Input `back` steps before each row: from x inside the segment, else from its history."""
    src = pos - back
    in_x = src >= 0
    row = tl.where(in_x, rows - back, seg * (W - 1) + (W - 1) + src)
    ptr = tl.where(in_x[:, None], x, init) + (row[:, None].to(tl.int64) * D + cols[None, :])
    return tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(COMPUTE)


@triton.jit
def _row_table_kernel(offsets, seg_of_row, pos_of_row, n, n_seg, BLOCK: tl.constexpr,
                      SEARCH_STEPS: tl.constexpr, PDL: tl.constexpr):
    """Each row's segment (n_seg for a row in none) and its position in it."""
    pdl.enter(PDL)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seg = segment_of(offsets, rows, n_seg, SEARCH_STEPS)
    start = tl.load(offsets + seg, mask=(rows < n) & (seg < n_seg), other=0).to(tl.int32)
    tl.store(seg_of_row + rows, seg, mask=rows < n)
    tl.store(pos_of_row + rows, rows - start, mask=rows < n)


@triton.jit
def _tile_of_program(D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(row block, column block) of this program on a 1-D grid of row blocks x column blocks. The
    column blocks of a row block launch next to each other, so the programs running at once read
    and write whole rows, contiguous memory, rather than one column stripe of many rows."""
    n_col_blocks: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    pid = tl.program_id(0)
    return pid // n_col_blocks, pid % n_col_blocks


@triton.jit
def _rows_and_segments(seg_of_row, pos_of_row, row_block, n, n_seg, BLOCK_N: tl.constexpr):
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.load(seg_of_row + rows, mask=rows < n, other=n_seg)
    pos = tl.load(pos_of_row + rows, mask=rows < n, other=0)
    return rows, seg, pos, (rows < n) & (seg < n_seg)


@triton.jit
def _preactivation(x, init, weight, bias, rows, seg, pos, row_ok, cols, col_ok,
                   D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   COMPUTE: tl.constexpr):
    z = tl.zeros((BLOCK_N, BLOCK_D), dtype=COMPUTE)
    for i in tl.static_range(W):
        w_i = tl.load(weight + cols * W + i, mask=col_ok, other=0.0).to(COMPUTE)
        z += _tap(x, init, rows, seg, pos, W - 1 - i, cols, row_ok, col_ok, D, W, COMPUTE) * w_i[None, :]
    return z + tl.load(bias + cols, mask=col_ok, other=0.0).to(COMPUTE)[None, :]


@triton.jit
def _final_state(x, init, offsets, final, s, cols, col_ok, D: tl.constexpr, W: tl.constexpr):
    """final[s, j] = the input at position len - (W-1) + j of (history ++ segment)."""
    start = tl.load(offsets + s)
    length = tl.load(offsets + s + 1) - start
    for j in tl.static_range(W - 1):
        src = length - (W - 1) + j
        from_x = tl.load(x + (start + src) * D + cols, mask=col_ok & (src >= 0), other=0.0)
        hist_row = s * (W - 1) + (W - 1) + src
        from_hist = tl.load(init + hist_row * D + cols, mask=col_ok & (src < 0), other=0.0)
        tl.store(final + (s * (W - 1) + j) * D + cols, (from_x + from_hist).to(final.dtype.element_ty),
                 mask=col_ok)


@triton.jit
def _conv_kernel(x, init, weight, bias, offsets, seg_of_row, pos_of_row, y, final, n, n_seg, row_blocks,
                 D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 COMPUTE: tl.constexpr, PDL: tl.constexpr):
    """Row blocks [0, row_blocks) convolve blocks of rows; the n_seg after them each copy a
    segment's final state (one launch for both)."""
    pdl.enter(PDL)
    row_block, col_block = _tile_of_program(D, BLOCK_D)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if row_block < row_blocks:
        rows, seg, pos, row_ok = _rows_and_segments(seg_of_row, pos_of_row, row_block, n, n_seg, BLOCK_N)
        z = _preactivation(x, init, weight, bias, rows, seg, pos, row_ok, cols, col_ok, D, W, BLOCK_N,
                           BLOCK_D, COMPUTE)
        out = tl.where(row_ok[:, None], z * tl.sigmoid(z), 0.0)
        tl.store(y + rows[:, None].to(tl.int64) * D + cols[None, :], out.to(y.dtype.element_ty),
                 mask=(rows < n)[:, None] & col_ok[None, :])
    else:
        _final_state(x, init, offsets, final, row_block - row_blocks, cols, col_ok, D, W)


@triton.jit
def _dz_kernel(x, init, weight, bias, seg_of_row, pos_of_row, d_y, d_z, n, n_seg,
               D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               COMPUTE: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row_block, col_block = _tile_of_program(D, BLOCK_D)
    rows, seg, pos, row_ok = _rows_and_segments(seg_of_row, pos_of_row, row_block, n, n_seg, BLOCK_N)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    z = _preactivation(x, init, weight, bias, rows, seg, pos, row_ok, cols, col_ok, D, W, BLOCK_N, BLOCK_D,
                       COMPUTE)
    tile = rows[:, None].to(tl.int64) * D + cols[None, :]
    dy = tl.load(d_y + tile, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(COMPUTE)
    sig = tl.sigmoid(z)
    dz = tl.where(row_ok[:, None], dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
    tl.store(d_z + tile, dz.to(d_z.dtype.element_ty), mask=(rows < n)[:, None] & col_ok[None, :])


@triton.jit
def _dx_kernel(x, init, d_z, d_final, weight, offsets, seg_of_row, pos_of_row, d_x, d_init, d_w_part,
               d_b_part, n, n_seg, D: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROW_BLOCKS: tl.constexpr, COMPUTE: tl.constexpr,
               PDL: tl.constexpr):
    """ROW_BLOCKS blocks of BLOCK_N table rows (x rows, then history rows) per program. The weight
    and bias sums accumulate elementwise and are reduced over rows once, at the end: a reduction
    across warps per block of rows cost more than the loads."""
    pdl.enter(PDL)
    row_block, col_block = _tile_of_program(D, BLOCK_D)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    back = tl.arange(0, BLOCK_W)  # the output `back` steps later reads a row through tap W-1-back
    tap = W - 1 - back
    tap_w = tl.load(weight + cols[None, :] * W + tap[:, None], mask=(back < W)[:, None] & col_ok[None, :],
                    other=0.0).to(COMPUTE)
    d_w = tl.zeros((BLOCK_N, BLOCK_W, BLOCK_D), dtype=COMPUTE)
    d_b = tl.zeros((BLOCK_N, BLOCK_D), dtype=COMPUTE)
    for i in range(ROW_BLOCKS):
        r = (row_block * ROW_BLOCKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        is_x = r < n
        hist = r - n
        seg_x = tl.load(seg_of_row + r, mask=is_x, other=n_seg)
        seg = tl.where(is_x, seg_x, hist // (W - 1))
        row_ok = tl.where(is_x, seg_x < n_seg, hist < n_seg * (W - 1))
        start = tl.load(offsets + seg, mask=row_ok, other=0).to(tl.int32)
        length = tl.load(offsets + seg + 1, mask=row_ok, other=0).to(tl.int32) - start
        pos = tl.where(is_x, tl.load(pos_of_row + r, mask=is_x, other=0), hist % (W - 1) - (W - 1))
        tile_ok = row_ok[:, None] & col_ok[None, :]
        own = tl.where(is_x, r, hist)[:, None].to(tl.int64) * D + cols[None, :]  # this row in x or init
        value = tl.load(tl.where(is_x[:, None], x, init) + own, mask=tile_ok, other=0.0).to(COMPUTE)
        d_b += tl.load(d_z + own, mask=tile_ok & is_x[:, None], other=0.0).to(COMPUTE)

        out_pos = pos[:, None] + back[None, :]  # [rows, back]: the outputs that read each row
        ok = row_ok[:, None] & (back < W)[None, :] & (out_pos >= 0) & (out_pos < length[:, None])
        dz = tl.load(d_z + (start[:, None] + out_pos)[:, :, None].to(tl.int64) * D + cols[None, None, :],
                     mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(COMPUTE)
        d_w += value[:, None, :] * dz
        acc = tl.sum(dz * tap_w[None, :, :], axis=1)
        j = pos - length + (W - 1)  # which final-state entry copied this row, if any
        ok = row_ok & (j >= 0) & (j < W - 1)
        acc += tl.load(d_final + (seg * (W - 1) + j)[:, None].to(tl.int64) * D + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0).to(COMPUTE)
        # every x row, 0 in rows past the segments; history rows of real segments
        tl.store(d_x + own, acc.to(d_x.dtype.element_ty), mask=is_x[:, None] & col_ok[None, :])
        tl.store(d_init + own, acc.to(d_init.dtype.element_ty), mask=tile_ok & ~is_x[:, None])
    part = row_block * D + cols
    tl.store(d_w_part + part[None, :] * W + tap[:, None], tl.sum(d_w, axis=0),
             mask=(back < W)[:, None] & col_ok[None, :])
    tl.store(d_b_part + part, tl.sum(d_b, axis=0), mask=col_ok)


def default_config() -> dict:
    """Rows and channels per program, and warps: the forward and `_dz_kernel` are fastest on 32 x 128
    tiles; `_dx_kernel` takes dx_row_blocks blocks of dx_block_n rows, 128 channels wide
    (benchmarks/RESULTS.md#why-these-defaults)."""
    return dict(block_n=32, block_n_backward=32, block_d=128, block_d_backward=128, warps=4, dz_warps=4,
                dx_block_n=8, dx_row_blocks=128, dx_warps=4)


def _tile_grid(row_blocks: int, d: int, block_d: int) -> tuple[int]:
    """The 1-D grid of `_tile_of_program`: every column block of every row block."""
    return (row_blocks * triton.cdiv(d, block_d),)


def _row_table(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment, position in it) of each of the n rows, int32: one launch per op call."""
    n_seg = offsets.shape[0] - 1
    seg_of_row = torch.empty(n, dtype=torch.int32, device=offsets.device)
    pos_of_row = torch.empty_like(seg_of_row)
    if n > 0:
        block = 1024
        _row_table_kernel[(triton.cdiv(n, block),)](offsets, seg_of_row, pos_of_row, n, n_seg, BLOCK=block,
                                                     SEARCH_STEPS=max(1, n_seg.bit_length()),
                                                     **pdl.launch_options(offsets.device))
    return seg_of_row, pos_of_row


def segment_conv_triton(x, weight, bias, offsets, initial_state, config: dict | None = None):
    """Same contract as `mom::segment_conv`: (silu(conv) [N, D], final state [S, W-1, D]) in x's
    dtype. config: overrides of `default_config()`."""
    cfg = dict(default_config(), **(config or {}))
    x, weight, bias, offsets, initial_state = (
        t.contiguous() for t in (x, weight, bias, offsets, initial_state))
    n, d = x.shape
    width = weight.shape[1]
    n_seg = offsets.shape[0] - 1
    y = torch.empty_like(x)
    final = torch.empty_like(initial_state)
    row_blocks = triton.cdiv(n, cfg["block_n"])
    if row_blocks + n_seg > 0 and d > 0:
        _conv_kernel[_tile_grid(row_blocks + n_seg, d, cfg["block_d"])](
            x, initial_state, weight, bias, offsets, *_row_table(offsets, n), y, final, n, n_seg, row_blocks,
            D=d, W=width, BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], COMPUTE=compute_type(x.dtype),
            **pdl.launch_options(x.device), num_warps=cfg["warps"])
    return y, final


def segment_conv_backward_triton(d_y, d_final, x, weight, bias, offsets, initial_state,
                                 config: dict | None = None):
    """Same contract as `mom::segment_conv_backward`: (dx, d_weight, d_bias, d_initial_state).
    config: overrides of `default_config()`."""
    cfg = dict(default_config(), **(config or {}))
    block_n, block_d = cfg["block_n_backward"], cfg["block_d_backward"]
    d_y, d_final, x, weight, bias, offsets, initial_state = (
        t.contiguous() for t in (d_y, d_final, x, weight, bias, offsets, initial_state))
    n, d = x.shape
    width = weight.shape[1]
    n_seg = offsets.shape[0] - 1
    compute = compute_type(x.dtype)
    # d_z in x's dtype: a bf16 model's d_x is bf16 anyway, and d_z crosses memory twice (the
    # largest traffic of the backward)
    d_z = torch.empty(n, d, dtype=x.dtype, device=x.device)
    table_rows = n + n_seg * (width - 1)
    dx_rows = cfg["dx_block_n"] * cfg["dx_row_blocks"]
    row_blocks = triton.cdiv(table_rows, dx_rows)
    acc = compute_dtype(x.dtype)
    d_w_part = torch.empty(row_blocks, d, width, dtype=acc, device=x.device)
    d_b_part = torch.empty(row_blocks, d, dtype=acc, device=x.device)
    d_x = torch.empty_like(x)
    d_init = torch.empty_like(initial_state)
    seg_of_row, pos_of_row = _row_table(offsets, n)
    if n > 0 and d > 0:
        _dz_kernel[_tile_grid(triton.cdiv(n, block_n), d, block_d)](
            x, initial_state, weight, bias, seg_of_row, pos_of_row, d_y, d_z, n, n_seg,
            D=d, W=width, BLOCK_N=block_n, BLOCK_D=block_d, COMPUTE=compute,
            **pdl.launch_options(x.device), num_warps=cfg["dz_warps"])
    if table_rows > 0 and d > 0:
        _dx_kernel[_tile_grid(row_blocks, d, block_d)](
            x, initial_state, d_z, d_final, weight, offsets, seg_of_row, pos_of_row, d_x, d_init, d_w_part,
            d_b_part, n, n_seg, D=d, W=width, BLOCK_W=triton.next_power_of_2(width),
            BLOCK_N=cfg["dx_block_n"], BLOCK_D=block_d, ROW_BLOCKS=cfg["dx_row_blocks"], COMPUTE=compute,
            **pdl.launch_options(x.device), num_warps=cfg["dx_warps"])
    return (d_x, d_w_part.sum(0).to(weight.dtype), d_b_part.sum(0).to(bias.dtype), d_init)
