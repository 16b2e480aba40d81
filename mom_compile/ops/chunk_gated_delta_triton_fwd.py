"""Triton kernels of the chunked gated delta rule, forward: the WY factors, the inter-chunk state
pass and the outputs (the launch code is `chunk_gated_delta_triton.py`; the math:
docs/math.md#the-chunked-form).

Every chunk is C = 64 rows of one segment (`chunk_gated_delta.CHUNK_SIZE`, not a tuning knob:
wy_solve_kernel is written out for four 16-row blocks and asserts it, and the residuals are laid
out in chunks of it); the chunk table says which segment and which first row, and a segment's
last chunk may be short. Rows of a chunk past its segment's end load as
k = q = v = g = beta = 0, which makes them no-ops, and are never stored. Per chunk, with
G = cumsum(g) inside the chunk and the state S0 before it:
    A = strict lower beta_i e^{G_i-G_j} k_i.k_j,  T = (I + A)^{-1}
    W = T diag(beta e^G) K,  U = T diag(beta) V,  Vn = U - W S0
    O = scale (diag(e^G) Q S0 + (Q K^T o Gamma) Vn),   Gamma_ij = e^{G_i-G_j} for i >= j, else 0
    S1 = e^{G_last} S0 + (diag(e^{G_last-G}) K)^T Vn
Since g <= 0, every exponent taken is <= 0 once masked to i >= j, so nothing overflows.

Products run on the tensor cores with operands in the DOT dtype (the input dtype for bf16/fp16,
float32 as tf32x3 for float32 inputs, float64 for float64 inputs) and accumulate in COMPUTE (float32,
or float64). T, a product of float32 factors, is computed in COMPUTE.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl


@triton.jit
def chunk_bounds(table, offsets, cid):
    """(segment, first row, segment end) of chunk `cid`; segment < 0 marks a slot past the real
    chunk count (the grid is an upper bound so that it depends on shapes only)."""
    seg = tl.load(table + 2 * cid)
    start = tl.load(table + 2 * cid + 1)
    end = tl.load(offsets + tl.maximum(seg, 0) + 1).to(tl.int64)
    return seg, start, end


@triton.jit
def item_and_block(NB: tl.constexpr):
    """(item, block) of this program on a grid of (items * NB, H). The NB blocks of one item (the
    V- or K-blocks of one chunk) are launched next to each other, so the tiles they all
    read (the item's rows of q, k, W) come from DRAM once and then from L2."""
    pid = tl.program_id(0)
    return pid // NB, pid % NB


@triton.jit
def segment_head_block(order, H: tl.constexpr, NB: tl.constexpr):
    """(segment, head, V-block) of a sequential pass's program on a grid of S * H * NB. Programs
    launch in segment order `order` (longest first): a segment's work is its chunks, one after
    another, and starting the long ones first leaves the short ones to fill the machine at the end.
    The blocks of one segment and head launch next to each other (see item_and_block)."""
    pid = tl.program_id(0)
    return tl.load(order + pid // (H * NB)), pid // NB % H, pid % NB


@triton.jit
def chunk_decay(g, rows, ok, h, H: tl.constexpr, C: tl.constexpr, COMPUTE: tl.constexpr):
    """G = within-chunk cumulative log-decay (padding adds 0) and G at the chunk's last row."""
    cum = tl.cumsum(tl.load(g + rows * H + h, mask=ok, other=0.0).to(COMPUTE), axis=0)
    last = tl.sum(tl.where(tl.arange(0, C) == C - 1, cum, 0.0), axis=0)
    return cum, last


@triton.jit
def gated_lower(cum, INCLUSIVE: tl.constexpr, C: tl.constexpr):
    """Gamma: e^{G_i-G_j} on (INCLUSIVE) or strictly below the diagonal, 0 above; the exponent is
    masked before exp so that the upper triangle (positive exponents) cannot overflow."""
    c = tl.arange(0, C)
    if INCLUSIVE:
        keep = c[:, None] >= c[None, :]
    else:
        keep = c[:, None] > c[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, cum[:, None] - cum[None, :], 0.0)), 0.0)


@triton.jit
def load_rows(ptr, rows, ok, h, cols, H: tl.constexpr, D: tl.constexpr):
    """Tile [rows, cols] of a packed [N, H, D] tensor; rows or cols out of range read 0."""
    mask = ok[:, None] & (cols < D)[None, :]
    return tl.load(ptr + (rows * H + h)[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, value, rows, ok, h, cols, H: tl.constexpr, D: tl.constexpr):
    mask = ok[:, None] & (cols < D)[None, :]
    tl.store(ptr + (rows * H + h)[:, None] * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def state_offsets(idx, h, krow, vcol, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Offsets and mask of a [krow, vcol] tile of state `idx` in an [*, H, K, V] buffer."""
    off = ((idx.to(tl.int64) * H + h) * K + krow[:, None]) * V + vcol[None, :]
    return off, (krow < K)[:, None] & (vcol < V)[None, :]


@triton.jit
def _gate_block(kk, beta_i, cum_i, cum_j, DIAG: tl.constexpr):
    """One 16x16 block of A = beta_i e^{G_i-G_j} k_i.k_j; a diagonal block keeps only i > j."""
    if DIAG:
        r = tl.arange(0, 16)
        strict = r[:, None] > r[None, :]
        return tl.where(strict, beta_i[:, None] * tl.exp(tl.where(strict, cum_i[:, None] - cum_j[None, :],
                                                                     0.0)) * kk, 0.0)
    return beta_i[:, None] * tl.exp(cum_i[:, None] - cum_j[None, :]) * kk


@triton.jit
def _invert_unit_lower(a):
    """(I + a)^{-1} for a strictly lower 16x16 block, by forward substitution one row at a time:
    row i of the inverse is e_i - sum_{m<i} a_im (row m), and rows m < i are final by then. Exact
    arithmetic of the triangular solve (no power series, whose terms can grow and cancel)."""
    r = tl.arange(0, 16)
    inv = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(a.dtype)
    for i in tl.static_range(1, 16):
        a_row = tl.sum(tl.where(r[:, None] == i, a, 0.0), axis=0)
        inv = tl.where(r[:, None] == i, inv - tl.sum(a_row[:, None] * inv, axis=0)[None, :], inv)
    return inv


@triton.jit
def _store_block(t_out, blk, rows, ok, h, col0, H: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, 16)
    tl.store(t_out + (rows * H + h)[:, None] * C + col0 + r[None, :], blk.to(t_out.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _sub_rows(ptr, rows, ok, h, H: tl.constexpr, COMPUTE: tl.constexpr):
    return tl.load(ptr + rows * H + h, mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def wy_solve_kernel(
    k, g, beta, offsets, table, t_out,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr, PDL: tl.constexpr,
):
    """T = (I + A)^{-1} of one (chunk, head), stored row-wise into t_out [N, H, C] (lower
    triangle; readers mask the rest). A is built directly in its ten 16x16 lower blocks
    (A_ab = gated K_a K_b^T), the four diagonal blocks are inverted by substitution and the
    others follow from T_ab = -T_aa sum_{b<=m<a} A_am T_mb."""
    pdl.enter(PDL)
    tl.static_assert(C == 64, "wy_solve_kernel solves chunks of exactly 64 rows (four 16-row blocks)")
    cid = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    r = tl.arange(0, 16)
    rows0 = start + r
    rows1 = rows0 + 16
    rows2 = rows0 + 32
    rows3 = rows0 + 48
    ok0, ok1, ok2, ok3 = rows0 < end, rows1 < end, rows2 < end, rows3 < end
    g0 = _sub_rows(g, rows0, ok0, h, H, COMPUTE)
    g1 = _sub_rows(g, rows1, ok1, h, H, COMPUTE)
    g2 = _sub_rows(g, rows2, ok2, h, H, COMPUTE)
    g3 = _sub_rows(g, rows3, ok3, h, H, COMPUTE)
    cum0 = tl.cumsum(g0, axis=0)
    carry = tl.sum(g0, axis=0)
    cum1 = tl.cumsum(g1, axis=0) + carry
    carry += tl.sum(g1, axis=0)
    cum2 = tl.cumsum(g2, axis=0) + carry
    carry += tl.sum(g2, axis=0)
    cum3 = tl.cumsum(g3, axis=0) + carry
    b0 = _sub_rows(beta, rows0, ok0, h, H, COMPUTE)
    b1 = _sub_rows(beta, rows1, ok1, h, H, COMPUTE)
    b2 = _sub_rows(beta, rows2, ok2, h, H, COMPUTE)
    b3 = _sub_rows(beta, rows3, ok3, h, H, COMPUTE)

    kk00 = tl.zeros((16, 16), dtype=COMPUTE)
    kk10 = tl.zeros((16, 16), dtype=COMPUTE)
    kk11 = tl.zeros((16, 16), dtype=COMPUTE)
    kk20 = tl.zeros((16, 16), dtype=COMPUTE)
    kk21 = tl.zeros((16, 16), dtype=COMPUTE)
    kk22 = tl.zeros((16, 16), dtype=COMPUTE)
    kk30 = tl.zeros((16, 16), dtype=COMPUTE)
    kk31 = tl.zeros((16, 16), dtype=COMPUTE)
    kk32 = tl.zeros((16, 16), dtype=COMPUTE)
    kk33 = tl.zeros((16, 16), dtype=COMPUTE)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x0 = load_rows(k, rows0, ok0, h, cols, H, K).to(DOT)
        x1 = load_rows(k, rows1, ok1, h, cols, H, K).to(DOT)
        x2 = load_rows(k, rows2, ok2, h, cols, H, K).to(DOT)
        x3 = load_rows(k, rows3, ok3, h, cols, H, K).to(DOT)
        kk00 += tl.dot(x0, tl.trans(x0), input_precision=PREC)
        kk10 += tl.dot(x1, tl.trans(x0), input_precision=PREC)
        kk11 += tl.dot(x1, tl.trans(x1), input_precision=PREC)
        kk20 += tl.dot(x2, tl.trans(x0), input_precision=PREC)
        kk21 += tl.dot(x2, tl.trans(x1), input_precision=PREC)
        kk22 += tl.dot(x2, tl.trans(x2), input_precision=PREC)
        kk30 += tl.dot(x3, tl.trans(x0), input_precision=PREC)
        kk31 += tl.dot(x3, tl.trans(x1), input_precision=PREC)
        kk32 += tl.dot(x3, tl.trans(x2), input_precision=PREC)
        kk33 += tl.dot(x3, tl.trans(x3), input_precision=PREC)

    t00 = _invert_unit_lower(_gate_block(kk00, b0, cum0, cum0, True))
    t11 = _invert_unit_lower(_gate_block(kk11, b1, cum1, cum1, True))
    t22 = _invert_unit_lower(_gate_block(kk22, b2, cum2, cum2, True))
    t33 = _invert_unit_lower(_gate_block(kk33, b3, cum3, cum3, True))
    a10 = _gate_block(kk10, b1, cum1, cum0, False)
    a20 = _gate_block(kk20, b2, cum2, cum0, False)
    a21 = _gate_block(kk21, b2, cum2, cum1, False)
    a30 = _gate_block(kk30, b3, cum3, cum0, False)
    a31 = _gate_block(kk31, b3, cum3, cum1, False)
    a32 = _gate_block(kk32, b3, cum3, cum2, False)
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=PREC32), input_precision=PREC32)
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=PREC32), input_precision=PREC32)
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=PREC32), input_precision=PREC32)
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=PREC32) + tl.dot(a21, t10, input_precision=PREC32),
                  input_precision=PREC32)
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=PREC32) + tl.dot(a32, t21, input_precision=PREC32),
                  input_precision=PREC32)
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=PREC32) + tl.dot(a31, t10, input_precision=PREC32)
                  + tl.dot(a32, t20, input_precision=PREC32), input_precision=PREC32)
    _store_block(t_out, t00, rows0, ok0, h, 0, H, C)
    _store_block(t_out, t10, rows1, ok1, h, 0, H, C)
    _store_block(t_out, t11, rows1, ok1, h, 16, H, C)
    _store_block(t_out, t20, rows2, ok2, h, 0, H, C)
    _store_block(t_out, t21, rows2, ok2, h, 16, H, C)
    _store_block(t_out, t22, rows2, ok2, h, 32, H, C)
    _store_block(t_out, t30, rows3, ok3, h, 0, H, C)
    _store_block(t_out, t31, rows3, ok3, h, 16, H, C)
    _store_block(t_out, t32, rows3, ok3, h, 32, H, C)
    _store_block(t_out, t33, rows3, ok3, h, 48, H, C)


@triton.jit
def load_t(t_buf, rows, ok, h, H: tl.constexpr, C: tl.constexpr):
    """T of a chunk as a [C, C] tile: lower triangle of the valid rows (the rest is 0)."""
    c = tl.arange(0, C)
    mask = ok[:, None] & (c[:, None] >= c[None, :])
    return tl.load(t_buf + (rows * H + h)[:, None] * C + c[None, :], mask=mask, other=0.0)


@triton.jit
def store_decays(decays, last_decay, cum, last, rows, ok, cid, h, H: tl.constexpr):
    """decays [N, H, 2]: e^{G_i} and e^{G_last-G_i} of each row; last_decay [slots, H]: e^{G_last}
    of each chunk. The sequential passes load them instead of a cumsum and a reduction over the
    chunk on their critical path."""
    tl.store(decays + (rows * H + h) * 2, tl.exp(cum), mask=ok)
    tl.store(decays + (rows * H + h) * 2 + 1, tl.exp(last - cum), mask=ok)
    tl.store(last_decay + cid * H + h, tl.exp(last))


@triton.jit
def load_decay(decays, rows, ok, h, H: tl.constexpr, WHICH: tl.constexpr):
    """Column WHICH of `store_decays`' rows: 0 e^{G_i}, 1 e^{G_last-G_i}; 0 for padding rows."""
    return tl.load(decays + (rows * H + h) * 2 + WHICH, mask=ok, other=0.0)


@triton.jit
def wy_apply_kernel(
    k, v, g, beta, offsets, table, t_buf, w, u, decays, last_decay,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, WITH_U: tl.constexpr,
    PDL: tl.constexpr,
):
    """W = T diag(beta e^G) K and (WITH_U) U = T diag(beta) V of one (chunk, head), once for all
    V-blocks of the state pass; and the decays the sequential passes read (`store_decays`)."""
    pdl.enter(PDL)
    cid = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    rows = start + tl.arange(0, C)
    ok = rows < end
    cum, last = chunk_decay(g, rows, ok, h, H, C, COMPUTE)
    store_decays(decays, last_decay, cum, last, rows, ok, cid, h, H)
    b = tl.load(beta + rows * H + h, mask=ok, other=0.0).to(COMPUTE)
    t = load_t(t_buf, rows, ok, h, H, C).to(DOT)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = ((b * tl.exp(cum))[:, None] * load_rows(k, rows, ok, h, cols, H, K).to(COMPUTE)).to(DOT)
        store_rows(w, tl.dot(t, x, input_precision=PREC), rows, ok, h, cols, H, K)
    if WITH_U:
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            x = (b[:, None] * load_rows(v, rows, ok, h, cols, H, V).to(COMPUTE)).to(DOT)
            store_rows(u, tl.dot(t, x, input_precision=PREC), rows, ok, h, cols, H, V)


@triton.jit
def state_fwd_kernel(
    k, decays, last_decay, w, u, offsets, order, first_chunk, init, h_buf, v_new, final,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, HAS_INIT: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """The only sequential part, per (segment, head, V-block): walk the segment's chunks with the
    [K, BV] state slice in registers; save each chunk's start state (h_buf) and Vn = U - W S0.
    With STAGES > 1 Triton software-pipelines the loop: the next chunks' W, U, K and decays, which
    do not depend on the state, load while this chunk computes."""
    pdl.enter(PDL)
    s, h, vb = segment_head_block(order, H, tl.cdiv(V, BV))
    kk = tl.arange(0, BLOCK_K)
    col = vb * BV + tl.arange(0, BV)
    start = tl.load(offsets + s).to(tl.int64)
    end = tl.load(offsets + s + 1).to(tl.int64)
    first = tl.load(first_chunk + s)
    tile, tile_ok = state_offsets(s, h, kk, col, H, K, V)
    if HAS_INIT:
        state = tl.load(init + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        state = tl.zeros((BLOCK_K, BV), dtype=COMPUTE)
    for i in tl.range(0, tl.cdiv(end - start, C), num_stages=STAGES):
        rows = start + i * C + tl.arange(0, C)
        ok = rows < end
        h_off, h_ok = state_offsets(first + i, h, kk, col, H, K, V)
        tl.store(h_buf + h_off, state.to(h_buf.dtype.element_ty), mask=h_ok)
        w_c = load_rows(w, rows, ok, h, kk, H, K).to(DOT)
        vn = load_rows(u, rows, ok, h, col, H, V).to(COMPUTE) - tl.dot(w_c, state.to(DOT),
                                                                        input_precision=PREC)
        store_rows(v_new, vn.to(DOT), rows, ok, h, col, H, V)
        # K^T diag(e^{G_last-G}) Vn with the decay on the [C, BV] Vn rather than the [C, K] K: a
        # quarter of the work at K = 4 BV, and K goes to the product straight from memory
        vn_end = (vn * load_decay(decays, rows, ok, h, H, 1)[:, None]).to(DOT)
        k_c = load_rows(k, rows, ok, h, kk, H, K).to(DOT)
        state = state * tl.load(last_decay + (first + i) * H + h) + tl.dot(tl.trans(k_c), vn_end,
                                                                          input_precision=PREC)
    tl.store(final + tile, state.to(final.dtype.element_ty), mask=tile_ok)


@triton.jit
def output_kernel(
    q, k, g, offsets, table, h_buf, v_new, o, scale_hi, scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """O = scale (diag(e^G) Q S0 + (Q K^T o Gamma) Vn) of one (chunk, head, V-block)."""
    pdl.enter(PDL)
    cid, vb = item_and_block(tl.cdiv(V, BV))
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    col = vb * BV + tl.arange(0, BV)
    rows = start + tl.arange(0, C)
    ok = rows < end
    qk = tl.zeros((C, C), dtype=COMPUTE)
    inter = tl.zeros((C, BV), dtype=COMPUTE)
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        q_c = load_rows(q, rows, ok, h, kc, H, K).to(DOT)
        k_c = load_rows(k, rows, ok, h, kc, H, K).to(DOT)
        h_off, h_ok = state_offsets(cid, h, kc, col, H, K, V)
        s0 = tl.load(h_buf + h_off, mask=h_ok, other=0.0).to(DOT)
        qk += tl.dot(q_c, tl.trans(k_c), input_precision=PREC)
        inter += tl.dot(q_c, s0, input_precision=PREC)
    cum, _ = chunk_decay(g, rows, ok, h, H, C, COMPUTE)
    p = (qk * gated_lower(cum, True, C)).to(DOT)
    vn = load_rows(v_new, rows, ok, h, col, H, V).to(DOT)
    out = scale * (tl.exp(cum)[:, None] * inter + tl.dot(p, vn, input_precision=PREC))
    store_rows(o, out, rows, ok, h, col, H, V)
