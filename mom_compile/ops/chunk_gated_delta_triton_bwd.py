"""Triton kernels of the chunked gated delta rule, backward (launch code:
`chunk_gated_delta_triton.py`; notation: `chunk_gated_delta_triton_fwd.py`). The forward's T, W,
U, chunk start states S0 and Vn are recomputed first. Then, per chunk, with dS1 the gradient of
the state after the chunk:
    dVn = scale (Q K^T o Gamma)^T dO + diag(e^{G_last-G}) K dS1             (dvn_local + state_bwd)
    dS0 = e^{G_last} dS1 + scale (diag(e^G) Q)^T dO - W^T dVn                (state_bwd)
    dQ  = scale diag(e^G) dO S0^T + dP K,   dP = scale (dO Vn^T) o Gamma      (grad_qkw)
    dK  = dP^T Q + diag(e^{G_last-G}) Vn dS1^T                               (grad_qkw)
          + diag(beta e^G) T^T dW + M K + M^T K                               (wy_bwd)
    dW  = -dVn S0^T;  dU = dVn;  dV = diag(beta) T^T dVn
    dA  = -(T^T (dW (diag(beta e^G) K)^T + dVn (diag(beta) V)^T) T^T), strictly lower
    M   = dA o beta_i Gamma (the gradient of k_i.k_j)
dbeta collects the three places beta enters (A, W's and U's right-hand sides). dG_i, the
gradient of the within-chunk cumulative decay, adds every term where e^{G_i} is a factor and
subtracts every term where e^{-G_i} is (each such term being grad . value): the output row (dO_i.O_i,
less the column sums of dP o QK^T), A (row sums less column sums of dA o A), W's right-hand side,
and the state update (e^{-G_i} in K's decay to the chunk end; e^{G_last} on the last row). dg is then
the reverse cumulative sum of dG inside the chunk.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import pdl
from .chunk_gated_delta_triton_fwd import (
    chunk_bounds,
    chunk_decay,
    gated_lower,
    item_and_block,
    load_decay,
    load_rows,
    load_t,
    segment_head_block,
    state_offsets,
    store_rows,
)


@triton.jit
def dvn_local_kernel(
    q, k, g, offsets, table, d_o, d_vn, scale_hi, scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """The within-chunk part of dVn, scale (Q K^T o Gamma)^T dO, per (chunk, head) over all V:
    it does not depend on the state, so the sequential pass only adds to it."""
    pdl.enter(PDL)
    cid = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    rows = start + tl.arange(0, C)
    ok = rows < end
    qk = tl.zeros((C, C), dtype=COMPUTE)
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        q_c = load_rows(q, rows, ok, h, kc, H, K).to(DOT)
        k_c = load_rows(k, rows, ok, h, kc, H, K).to(DOT)
        qk += tl.dot(q_c, tl.trans(k_c), input_precision=PREC)
    cum, _ = chunk_decay(g, rows, ok, h, H, C, COMPUTE)
    p_t = tl.trans(qk * gated_lower(cum, True, C)).to(DOT)
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        do_c = load_rows(d_o, rows, ok, h, vc, H, V).to(DOT)
        store_rows(d_vn, scale * tl.dot(p_t, do_c, input_precision=PREC), rows, ok, h, vc, H, V)


@triton.jit
def state_bwd_kernel(
    q, k, decays, last_decay, w, d_o, offsets, order, first_chunk, d_final, dh_buf, d_vn, d_init, scale_hi,
    scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, HAS_DFINAL: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """Per (segment, head, V-block), chunks in reverse with dS in registers: save each chunk's dS1
    (dh_buf), complete dVn in place (d_vn holds the within-chunk part on entry), step dS back.
    STAGES: software pipelining, as in state_fwd_kernel."""
    pdl.enter(PDL)
    s, h, vb = segment_head_block(order, H, tl.cdiv(V, BV))
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    kk = tl.arange(0, BLOCK_K)
    col = vb * BV + tl.arange(0, BV)
    start = tl.load(offsets + s).to(tl.int64)
    end = tl.load(offsets + s + 1).to(tl.int64)
    n_chunks = tl.cdiv(end - start, C)
    first = tl.load(first_chunk + s)
    tile, tile_ok = state_offsets(s, h, kk, col, H, K, V)
    if HAS_DFINAL:
        d_state = tl.load(d_final + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        d_state = tl.zeros((BLOCK_K, BV), dtype=COMPUTE)
    for i in tl.range(0, n_chunks, num_stages=STAGES):
        c = n_chunks - 1 - i
        rows = start + c * C + tl.arange(0, C)
        ok = rows < end
        h_off, h_ok = state_offsets(first + c, h, kk, col, H, K, V)
        tl.store(dh_buf + h_off, d_state.to(dh_buf.dtype.element_ty), mask=h_ok)
        # diag(e^{G_last-G}) (K dS): the decay on the [C, BV] product, K straight from memory (as
        # in state_fwd_kernel). Q keeps its decay: staging Q as well would take 2-stage bf16 at
        # K = 256 to 262 KB of shared memory, past sm_90's 227 KB
        k_c = load_rows(k, rows, ok, h, kk, H, K).to(DOT)
        dvn = (load_rows(d_vn, rows, ok, h, col, H, V).to(COMPUTE)
               + load_decay(decays, rows, ok, h, H, 1)[:, None]
               * tl.dot(k_c, d_state.to(DOT), input_precision=PREC))
        dvn = dvn.to(DOT)
        store_rows(d_vn, dvn, rows, ok, h, col, H, V)
        q_g = (load_rows(q, rows, ok, h, kk, H, K).to(COMPUTE)
               * load_decay(decays, rows, ok, h, H, 0)[:, None]).to(DOT)
        do_c = load_rows(d_o, rows, ok, h, col, H, V).to(DOT)
        w_c = load_rows(w, rows, ok, h, kk, H, K).to(DOT)
        d_state = (d_state * tl.load(last_decay + (first + c) * H + h)
                   + scale * tl.dot(tl.trans(q_g), do_c, input_precision=PREC)
                   - tl.dot(tl.trans(w_c), dvn, input_precision=PREC))
    tl.store(d_init + tile, d_state.to(d_init.dtype.element_ty), mask=tile_ok)


@triton.jit
def grad_qkw_kernel(
    q, k, g, offsets, table, d_o, h_buf, dh_buf, v_new, d_vn, dq, dk_part, dw, dg_part,
    scale_hi, scale_lo, n_rows,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """Per (chunk, head, K-block), summing over V: dQ (final), the output and state-update parts
    of dK (dk_part), dW, and this K-block's share of dG (dg_part[K-block]), the terms of dG being
    sums over K."""
    pdl.enter(PDL)
    cid, kb = item_and_block(tl.cdiv(K, BK))
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    rows = start + tl.arange(0, C)
    ok = rows < end
    kc = kb * BK + tl.arange(0, BK)
    q_c = load_rows(q, rows, ok, h, kc, H, K).to(DOT)
    k_c = load_rows(k, rows, ok, h, kc, H, K).to(DOT)
    acc_dq = tl.zeros((C, BK), dtype=COMPUTE)  # dO S0^T
    acc_dk = tl.zeros((C, BK), dtype=COMPUTE)  # Vn dS1^T
    acc_dw = tl.zeros((C, BK), dtype=COMPUTE)  # dVn S0^T
    acc_ds = tl.zeros((C, C), dtype=COMPUTE)  # dO Vn^T
    s_ds = tl.zeros((BK, ), dtype=COMPUTE)  # <S0, dS1>, this K-block's rows
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        do_c = load_rows(d_o, rows, ok, h, vc, H, V).to(DOT)
        vn = load_rows(v_new, rows, ok, h, vc, H, V).to(DOT)
        dvn = load_rows(d_vn, rows, ok, h, vc, H, V).to(DOT)
        h_off, h_ok = state_offsets(cid, h, kc, vc, H, K, V)
        s0 = tl.load(h_buf + h_off, mask=h_ok, other=0.0).to(DOT)
        ds1 = tl.load(dh_buf + h_off, mask=h_ok, other=0.0).to(DOT)
        acc_dq += tl.dot(do_c, tl.trans(s0), input_precision=PREC)
        acc_dk += tl.dot(vn, tl.trans(ds1), input_precision=PREC)
        acc_dw += tl.dot(dvn, tl.trans(s0), input_precision=PREC)
        acc_ds += tl.dot(do_c, tl.trans(vn), input_precision=PREC)
        s_ds += tl.sum(s0.to(COMPUTE) * ds1.to(COMPUTE), axis=1)
    cum, last = chunk_decay(g, rows, ok, h, H, C, COMPUTE)
    d_p = scale * acc_ds * gated_lower(cum, True, C)
    dq_inter = (scale * tl.exp(cum))[:, None] * acc_dq
    store_rows(dq, dq_inter + tl.dot(d_p.to(DOT), k_c, input_precision=PREC), rows, ok, h, kc, H, K)
    decay_end = tl.exp(last - cum)
    dk_c = decay_end[:, None] * acc_dk + tl.dot(tl.trans(d_p).to(DOT), q_c, input_precision=PREC)
    store_rows(dk_part, dk_c, rows, ok, h, kc, H, K)
    store_rows(dw, -acc_dw, rows, ok, h, kc, H, K)
    e = d_p * tl.dot(q_c, tl.trans(k_c), input_precision=PREC)
    r = tl.sum(k_c.to(COMPUTE) * decay_end[:, None] * acc_dk, axis=1)
    d_cum = tl.sum(q_c.to(COMPUTE) * dq_inter, axis=1) + tl.sum(e, axis=1) - tl.sum(e, axis=0) - r
    tail = tl.sum(r, axis=0) + tl.exp(last) * tl.sum(s_ds, axis=0)  # d/dG_last
    last_row = tl.minimum(start + C, end) - 1
    d_cum = tl.where(rows == last_row, d_cum + tail, d_cum)
    tl.store(dg_part + (kb * n_rows + rows) * H + h, d_cum, mask=ok)


@triton.jit
def wy_bwd_kernel(
    k, v, g, beta, offsets, table, t_buf, dw, d_vn, dk_part, dg_part, dk, dv, dg, dbeta, n_rows,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, N_KB: tl.constexpr, COMPUTE: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, PREC32: tl.constexpr, PDL: tl.constexpr,
):
    """Per (chunk, head): back through W = T X_w, U = T X_u and T = (I + A)^{-1}; writes dk, dv,
    dbeta and dg (dG's K-block shares from grad_qkw added, then reverse-summed in the chunk)."""
    pdl.enter(PDL)
    cid = tl.program_id(0)
    h = tl.program_id(1)
    seg, start, end = chunk_bounds(table, offsets, cid)
    if seg < 0:
        return
    rows = start + tl.arange(0, C)
    ok = rows < end
    cum, _ = chunk_decay(g, rows, ok, h, H, C, COMPUTE)
    b = tl.load(beta + rows * H + h, mask=ok, other=0.0).to(COMPUTE)
    bg = b * tl.exp(cum)
    t = load_t(t_buf, rows, ok, h, H, C).to(COMPUTE)
    t_dot = t.to(DOT)
    d_t = tl.zeros((C, C), dtype=COMPUTE)
    kk = tl.zeros((C, C), dtype=COMPUTE)
    d_beta = tl.zeros((C, ), dtype=COMPUTE)
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        k_c = load_rows(k, rows, ok, h, kc, H, K)
        x_w = (bg[:, None] * k_c.to(COMPUTE)).to(DOT)
        d_t += tl.dot(load_rows(dw, rows, ok, h, kc, H, K).to(DOT), tl.trans(x_w), input_precision=PREC)
        # K K^T from float32 operands: with 16-bit operands dbeta and dg differed from run to run
        # on Hopper (triton 3.6), the rest of the backward bit-identical
        k32 = k_c.to(COMPUTE)
        kk += tl.dot(k32, tl.trans(k32), input_precision=PREC32)
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        v_c = load_rows(v, rows, ok, h, vc, H, V).to(COMPUTE)
        dvn = load_rows(d_vn, rows, ok, h, vc, H, V).to(DOT)
        d_t += tl.dot(dvn, tl.trans((b[:, None] * v_c).to(DOT)), input_precision=PREC)
        d_xu = tl.dot(tl.trans(t_dot), dvn, input_precision=PREC)
        store_rows(dv, b[:, None] * d_xu, rows, ok, h, vc, H, V)
        d_beta += tl.sum(d_xu * v_c, axis=1)
    gamma = gated_lower(cum, False, C)
    # dA is only needed strictly below the diagonal, and every use below multiplies it by gamma,
    # which is 0 elsewhere: no mask of its own
    d_a = -tl.dot(tl.dot(tl.trans(t), d_t, input_precision=PREC32), tl.trans(t), input_precision=PREC32)
    kk_gated = kk * gamma
    d_beta += tl.sum(d_a * kk_gated, axis=1)
    f = d_a * b[:, None] * kk_gated
    d_cum = tl.sum(f, axis=1) - tl.sum(f, axis=0)
    m = (d_a * b[:, None] * gamma).to(DOT)
    for k0 in range(0, K, BK):
        kc = k0 + tl.arange(0, BK)
        k_c = load_rows(k, rows, ok, h, kc, H, K)
        d_xw = tl.dot(tl.trans(t_dot), load_rows(dw, rows, ok, h, kc, H, K).to(DOT), input_precision=PREC)
        k_dot = k_c.to(DOT)
        d_k = (load_rows(dk_part, rows, ok, h, kc, H, K).to(COMPUTE) + bg[:, None] * d_xw
               + tl.dot(m, k_dot, input_precision=PREC) + tl.dot(tl.trans(m), k_dot, input_precision=PREC))
        store_rows(dk, d_k, rows, ok, h, kc, H, K)
        along = tl.sum(d_xw * k_c.to(COMPUTE), axis=1)
        d_beta += tl.exp(cum) * along
        d_cum += bg * along
    for i in range(N_KB):
        d_cum += tl.load(dg_part + (i * n_rows + rows) * H + h, mask=ok, other=0.0)
    # dg_m = sum_{i >= m} dG_i; padding rows hold 0 and come last, so they add nothing
    d_g = tl.sum(d_cum, axis=0) - tl.cumsum(d_cum, axis=0) + d_cum
    tl.store(dg + rows * H + h, d_g.to(dg.dtype.element_ty), mask=ok)
    tl.store(dbeta + rows * H + h, d_beta.to(dbeta.dtype.element_ty), mask=ok)
