"""Triton CUDA kernels of `mom::chunk_gated_delta` and `mom::chunk_gated_delta_backward`.

The registered kernels are recurrent: one program per (segment, head, V-block) walks its segment's
tokens in time order with the [K, BLOCK_V] state slice in registers (fp32, or fp64 for float64
inputs so the kernels can be checked to rounding). The segment's bounds are read from `offsets`
inside the kernel, so the grid depends on shapes only and nothing syncs with the host. Columns of
the state evolve independently given k, so V-blocks never talk to each other; quantities that sum
over V (dq, dk, dbeta, dg) are accumulated across V-blocks with atomic adds.

Backward, per program, three passes over the segment (the per-token gradient is that of
`state_step.step_backward_reference`, with S the state before the token and S' after it):
  A (forward):  replay the state; save the residual r = v - e^g S^T k; add dq = scale S' d_o; save
                w = o . d_o, the V-block's share of it.
  B (backward): carry dS, the gradient w.r.t. S'. With d_s = dS + scale q d_o^T: du = d_s^T k,
                dv = beta du, dbeta += du . r, dk += d_s u, dS <- e^g (d_s - k dv^T).
  C (forward):  replay the state again; dk -= e^g S dv (needs dv of B and S of A: hence a pass).
dg uses an identity instead of <dS, S>, which would need S and dS at once: with the state written
as S_j = e^{G_j} S~_j (G the cumulative log-decay), G enters only as o_j = e^{G_j}(...) and through
v_j e^{-G_j}, so dF/dG_j = d_o_j . o_j - dv_j . v_j, plus <dS_final, S_final> at the segment's
last token, and dg_t = sum_{j >= t} dF/dG_j: a running sum in pass B.

`_chunk_fwd_kernel` is the chunked (WY) forward on the tensor cores, checked but not registered
(slower so far: see `chunk_gated_delta_chunked_triton`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_offsets(s, h, kk, col, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    return ((s * H + h).to(tl.int64) * K + kk[:, None]) * V + col[None, :]


@triton.jit
def _scan_fwd_kernel(
    q, k, v, g, beta, offsets, init, o, final, scale_hi, scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_INIT: tl.constexpr, COMPUTE: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    col = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    v_ok = col < V
    tile_ok = k_ok[:, None] & v_ok[None, :]
    tile = _tile_offsets(s, h, kk, col, H, K, V)
    start = tl.load(offsets + s)
    end = tl.load(offsets + s + 1)

    if HAS_INIT:
        state = tl.load(init + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        state = tl.zeros((BLOCK_K, BLOCK_V), dtype=COMPUTE)
    t = start
    while t < end:  # a while loop: the interpreter cannot take loaded values as range bounds
        rh = t * H + h
        t += 1
        k_t = tl.load(k + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        q_t = tl.load(q + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        v_t = tl.load(v + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
        decay = tl.exp(tl.load(g + rh).to(COMPUTE))
        b_t = tl.load(beta + rh).to(COMPUTE)
        state = state * decay
        u = b_t * (v_t - tl.sum(state * k_t[:, None], axis=0))
        state = state + k_t[:, None] * u[None, :]
        out = scale * tl.sum(state * q_t[:, None], axis=0)
        tl.store(o + rh * V + col, out.to(o.dtype.element_ty), mask=v_ok)
    tl.store(final + tile, state.to(final.dtype.element_ty), mask=tile_ok)


@triton.jit
def _chunk_fwd_kernel(
    q, k, v, g, beta, offsets, init, o, final, scale_hi, scale_lo,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr, INVERSE_STEPS: tl.constexpr, HAS_INIT: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """The chunked (WY) forward of `chunk_scan.py`'s docstring, one chunk of BLOCK_C rows per
    iteration, every product on the tensor cores. Rows past the segment's end load as k = q = v =
    beta = g = 0, which makes them no-ops, so a partial last chunk needs no special case."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    col = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    kk = tl.arange(0, BLOCK_K)
    c = tl.arange(0, BLOCK_C)
    k_ok = kk < K
    v_ok = col < V
    tile_ok = k_ok[:, None] & v_ok[None, :]
    tile = _tile_offsets(s, h, kk, col, H, K, V)
    start = tl.load(offsets + s)
    end = tl.load(offsets + s + 1)
    strict = c[:, None] > c[None, :]
    lower = c[:, None] >= c[None, :]
    eye = tl.where(c[:, None] == c[None, :], 1.0, 0.0).to(COMPUTE)

    if HAS_INIT:
        state = tl.load(init + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        state = tl.zeros((BLOCK_K, BLOCK_V), dtype=COMPUTE)
    c0 = start
    while c0 < end:
        rows = c0 + c
        row_ok = rows < end
        rh = rows * H + h
        kq_ok = row_ok[:, None] & k_ok[None, :]
        k_c = tl.load(k + rh[:, None] * K + kk[None, :], mask=kq_ok, other=0.0).to(COMPUTE)
        q_c = tl.load(q + rh[:, None] * K + kk[None, :], mask=kq_ok, other=0.0).to(COMPUTE)
        v_c = tl.load(v + rh[:, None] * V + col[None, :], mask=row_ok[:, None] & v_ok[None, :],
                      other=0.0).to(COMPUTE)
        g_c = tl.load(g + rh, mask=row_ok, other=0.0).to(COMPUTE)
        b_c = tl.load(beta + rh, mask=row_ok, other=0.0).to(COMPUTE)
        cum = tl.cumsum(g_c, axis=0)
        cum_last = tl.sum(tl.where(c == BLOCK_C - 1, cum, 0.0), axis=0)  # padding adds g = 0
        # e^{G_i - G_j} on and below the diagonal; the exponent is masked first so that the upper
        # triangle (positive exponents) cannot overflow.
        decay = tl.where(lower, tl.exp(tl.where(lower, cum[:, None] - cum[None, :], 0.0)), 0.0)
        # (I + L)^{-1} for the strictly lower L_ij = beta_i e^{G_i-G_j} k_i.k_j: with N = -L
        # nilpotent (N^BLOCK_C = 0), (I - N)^{-1} = (I + N)(I + N^2)(I + N^4)...: log2(C) squarings.
        kkt = tl.dot(k_c, tl.trans(k_c), input_precision=PRECISION)
        nil = tl.where(strict, -(b_c[:, None] * kkt * decay), 0.0)
        inverse = eye + nil
        for _ in tl.static_range(INVERSE_STEPS - 1):
            nil = tl.dot(nil, nil, input_precision=PRECISION)
            inverse = inverse + tl.dot(inverse, nil, input_precision=PRECISION)
        w_v = tl.dot(inverse, b_c[:, None] * v_c, input_precision=PRECISION)
        w_k = tl.dot(inverse, (b_c * tl.exp(cum))[:, None] * k_c, input_precision=PRECISION)
        u = w_v - tl.dot(w_k, state, input_precision=PRECISION)
        qk = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * decay
        out = tl.dot(q_c * tl.exp(cum)[:, None], state, input_precision=PRECISION)
        out = scale * (out + tl.dot(qk, u, input_precision=PRECISION))
        tl.store(o + rh[:, None] * V + col[None, :], out.to(o.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        k_to_end = k_c * tl.exp(cum_last - cum)[:, None]
        state = tl.exp(cum_last) * state + tl.dot(tl.trans(k_to_end), u, input_precision=PRECISION)
        c0 += BLOCK_C
    tl.store(final + tile, state.to(final.dtype.element_ty), mask=tile_ok)


@triton.jit
def _scan_bwd_kernel(
    q, k, v, g, beta, offsets, init, d_o, d_final, scale_hi, scale_lo,
    resid, w_share, dq, dk, dv, dg, dbeta, d_init, n_rows,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, COMPUTE: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    vb = tl.program_id(2)
    col = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    v_ok = col < V
    tile_ok = k_ok[:, None] & v_ok[None, :]
    tile = _tile_offsets(s, h, kk, col, H, K, V)
    start = tl.load(offsets + s)
    end = tl.load(offsets + s + 1)
    w_base = w_share + vb.to(tl.int64) * n_rows * H  # this V-block's row of w shares

    # Pass A: forward replay; residuals, dq, and this block's share of o . d_o.
    if HAS_INIT:
        state = tl.load(init + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        state = tl.zeros((BLOCK_K, BLOCK_V), dtype=COMPUTE)
    t = start
    while t < end:  # a while loop: the interpreter cannot take loaded values as range bounds
        rh = t * H + h
        t += 1
        k_t = tl.load(k + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        q_t = tl.load(q + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        v_t = tl.load(v + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
        do_t = tl.load(d_o + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
        decay = tl.exp(tl.load(g + rh).to(COMPUTE))
        b_t = tl.load(beta + rh).to(COMPUTE)
        state = state * decay
        r_t = v_t - tl.sum(state * k_t[:, None], axis=0)
        tl.store(resid + rh * V + col, r_t, mask=v_ok)
        state = state + k_t[:, None] * (b_t * r_t)[None, :]
        tl.atomic_add(dq + rh * K + kk, scale * tl.sum(state * do_t[None, :], axis=1), mask=k_ok)
        o_t = scale * tl.sum(state * q_t[:, None], axis=0)
        tl.store(w_base + rh, tl.sum(o_t * do_t, axis=0))
    if HAS_DFINAL:
        d_state = tl.load(d_final + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        d_state = tl.zeros((BLOCK_K, BLOCK_V), dtype=COMPUTE)
    dg_acc = tl.sum(tl.sum(d_state * state, axis=1), axis=0)  # <dS_final, S_final>, this block
    tl.debug_barrier()  # pass B reads what other threads of this program stored in pass A

    # Pass B: backward over the segment with dS in registers.
    t = end
    while t > start:
        t -= 1
        rh = t * H + h
        k_t = tl.load(k + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        q_t = tl.load(q + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        v_t = tl.load(v + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
        do_t = tl.load(d_o + rh * V + col, mask=v_ok, other=0.0).to(COMPUTE)
        r_t = tl.load(resid + rh * V + col, mask=v_ok, other=0.0)
        decay = tl.exp(tl.load(g + rh).to(COMPUTE))
        b_t = tl.load(beta + rh).to(COMPUTE)
        d_s = d_state + scale * q_t[:, None] * do_t[None, :]
        du = tl.sum(d_s * k_t[:, None], axis=0)
        dv_t = b_t * du
        tl.store(dv + rh * V + col, dv_t, mask=v_ok)
        tl.atomic_add(dbeta + rh, tl.sum(du * r_t, axis=0))
        tl.atomic_add(dk + rh * K + kk, tl.sum(d_s * (b_t * r_t)[None, :], axis=1), mask=k_ok)
        dg_acc += tl.load(w_base + rh) - tl.sum(dv_t * v_t, axis=0)
        tl.atomic_add(dg + rh, dg_acc)
        d_state = (d_s - k_t[:, None] * dv_t[None, :]) * decay
    tl.store(d_init + tile, d_state.to(d_init.dtype.element_ty), mask=tile_ok)
    tl.debug_barrier()  # pass C reads dv stored in pass B

    # Pass C: forward replay again for the part of dk that needs the state before each token.
    if HAS_INIT:
        state = tl.load(init + tile, mask=tile_ok, other=0.0).to(COMPUTE)
    else:
        state = tl.zeros((BLOCK_K, BLOCK_V), dtype=COMPUTE)
    t = start
    while t < end:  # a while loop: the interpreter cannot take loaded values as range bounds
        rh = t * H + h
        t += 1
        k_t = tl.load(k + rh * K + kk, mask=k_ok, other=0.0).to(COMPUTE)
        dv_t = tl.load(dv + rh * V + col, mask=v_ok, other=0.0)
        r_t = tl.load(resid + rh * V + col, mask=v_ok, other=0.0)
        decay = tl.exp(tl.load(g + rh).to(COMPUTE))
        b_t = tl.load(beta + rh).to(COMPUTE)
        state = state * decay
        tl.atomic_add(dk + rh * K + kk, -tl.sum(state * dv_t[None, :], axis=1), mask=k_ok)
        state = state + k_t[:, None] * (b_t * r_t)[None, :]


def split_scale(scale: float) -> tuple[float, float]:
    """Triton passes Python floats as float32; a float64 kernel rebuilds the exact scale from a
    float32 head and the float32 remainder."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale) - hi


def _compute(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """float32 arithmetic for every input precision; float64 only for float64 inputs (the test
    oracle's precision, so the kernels can be checked to rounding)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def block_sizes(dk: int, dv: int) -> tuple[int, int]:
    """Whole K (the delta correction reduces over it) and a V-block keeping the state tile at
    4K elements: 32 registers per thread at 4 warps for the state, and more programs in flight."""
    block_k = triton.next_power_of_2(dk)
    block_v = max(1, min(triton.next_power_of_2(dv), 4096 // block_k))
    return block_k, block_v


def chunk_gated_delta_triton(q, k, v, g, beta, offsets, initial_state, scale,
                             block_v: int | None = None, num_warps: int = 4):
    """Same contract as `mom::chunk_gated_delta`: (o [N, H, V] in v's dtype, final state
    [S, H, K, V] in the initial state's dtype, float32 when there is none), by the token-by-token
    kernel. It is the registered one: on an H200 it ran the layer's scan (98K rows, K=V=256,
    bf16) in 22 ms against 93 ms for the best configuration of the chunked kernel below."""
    q, k, v, g, beta, offsets = (t.contiguous() for t in (q, k, v, g, beta, offsets))
    n, h, dk = q.shape
    dv = v.shape[-1]
    n_seg = offsets.shape[0] - 1
    state_dtype = torch.float32 if initial_state is None else initial_state.dtype
    _, compute = _compute(torch.promote_types(q.dtype, state_dtype))
    o = torch.zeros_like(v)  # rows past offsets[-1] belong to no segment and read 0
    final = torch.empty(n_seg, h, dk, dv, dtype=state_dtype, device=q.device)
    init = final if initial_state is None else initial_state.contiguous()  # placeholder if absent
    block_k, default_v = block_sizes(dk, dv)
    block_v = block_v or default_v
    if n_seg * h > 0 and dk * dv > 0:
        _scan_fwd_kernel[(n_seg, h, triton.cdiv(dv, block_v))](
            q, k, v, g, beta, offsets, init, o, final, *split_scale(scale),
            H=h, K=dk, V=dv, BLOCK_K=block_k, BLOCK_V=block_v,
            HAS_INIT=initial_state is not None, COMPUTE=compute, num_warps=num_warps)
    return o, final


def chunked_config(dk: int, dv: int) -> dict:
    """Chunk length and V-block: the [C, K] tiles of q and k and the [K, BLOCK_V] state share the
    registers, so K = 256 takes half the chunk and V-block that K <= 128 does."""
    block_k = triton.next_power_of_2(dk)
    wide = block_k > 128
    block_v = min(max(16, triton.next_power_of_2(dv)), 32 if wide else 64)
    return dict(block_c=32 if wide else 64, block_v=block_v, num_warps=8 if block_k >= 128 else 4)


def chunk_gated_delta_chunked_triton(q, k, v, g, beta, offsets, initial_state, scale,
                                     config: dict | None = None):
    """`mom::chunk_gated_delta` by the chunked (WY) kernel: exact in float64, but not yet faster
    than the recurrent one (it recomputes the chunk's inverse in every V-block and runs its float32
    products as tf32x3), so it is not registered. Head sizes under 16 (below the tensor cores'
    tile) take the recurrent kernel."""
    n, h, dk = q.shape
    dv = v.shape[-1]
    on_gpu = q.device.type == "cuda"
    if on_gpu and min(dk, dv) < 16:
        return chunk_gated_delta_triton(q, k, v, g, beta, offsets, initial_state, scale)
    q, k, v, g, beta, offsets = (t.contiguous() for t in (q, k, v, g, beta, offsets))
    n_seg = offsets.shape[0] - 1
    state_dtype = torch.float32 if initial_state is None else initial_state.dtype
    _, compute = _compute(torch.promote_types(q.dtype, state_dtype))
    cfg = dict(chunked_config(dk, dv), **(config or {}))
    o = torch.zeros_like(v)  # rows past offsets[-1] belong to no segment and read 0
    final = torch.empty(n_seg, h, dk, dv, dtype=state_dtype, device=q.device)
    init = final if initial_state is None else initial_state.contiguous()  # placeholder if absent
    if n_seg * h > 0 and dk * dv > 0:
        _chunk_fwd_kernel[(n_seg, h, triton.cdiv(dv, cfg["block_v"]))](
            q, k, v, g, beta, offsets, init, o, final, *split_scale(scale),
            H=h, K=dk, V=dv, BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=cfg["block_v"],
            BLOCK_C=cfg["block_c"], INVERSE_STEPS=cfg["block_c"].bit_length() - 1,
            HAS_INIT=initial_state is not None, COMPUTE=compute,
            PRECISION="ieee" if compute == tl.float64 else "tf32x3", num_warps=cfg["num_warps"])
    return o, final


def chunk_gated_delta_backward_triton(q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final,
                                      block_v: int | None = None, num_warps: int = 4):
    """Same contract as `mom::chunk_gated_delta_backward`: (dq, dk, dv, dg, dbeta, d_initial)."""
    q, k, v, g, beta, offsets, d_o = (t.contiguous() for t in (q, k, v, g, beta, offsets, d_o))
    n, h, dk = q.shape
    dv = v.shape[-1]
    n_seg = offsets.shape[0] - 1
    state_dtype = torch.float32 if initial_state is None else initial_state.dtype
    compute_t, compute = _compute(torch.promote_types(q.dtype, state_dtype))
    block_k, default_v = block_sizes(dk, dv)
    block_v = block_v or default_v
    n_vblocks = triton.cdiv(dv, block_v)
    dev = q.device
    # Accumulated across V-blocks by atomics, so they start at zero (also right for rows in no
    # segment, which no program touches).
    dq32 = torch.zeros(n, h, dk, dtype=compute_t, device=dev)
    dk32 = torch.zeros(n, h, dk, dtype=compute_t, device=dev)
    dg32 = torch.zeros(n, h, dtype=compute_t, device=dev)
    dbeta32 = torch.zeros(n, h, dtype=compute_t, device=dev)
    dv32 = torch.zeros(n, h, dv, dtype=compute_t, device=dev)
    resid = torch.empty(n, h, dv, dtype=compute_t, device=dev)
    w_share = torch.empty(n_vblocks, n, h, dtype=compute_t, device=dev)
    d_init = torch.empty(n_seg, h, dk, dv, dtype=state_dtype, device=dev)
    init = d_init if initial_state is None else initial_state.contiguous()
    dfin = d_init if d_final is None else d_final.contiguous()
    if n_seg * h > 0 and dk * dv > 0:
        _scan_bwd_kernel[(n_seg, h, n_vblocks)](
            q, k, v, g, beta, offsets, init, d_o, dfin, *split_scale(scale),
            resid, w_share, dq32, dk32, dv32, dg32, dbeta32, d_init, n,
            H=h, K=dk, V=dv, BLOCK_K=block_k, BLOCK_V=block_v,
            HAS_INIT=initial_state is not None, HAS_DFINAL=d_final is not None, COMPUTE=compute,
            num_warps=num_warps)
    return (dq32.to(q.dtype), dk32.to(k.dtype), dv32.to(v.dtype), dg32.to(g.dtype),
            dbeta32.to(beta.dtype), d_init)


torch.library.register_kernel("mom::chunk_gated_delta", "cuda", chunk_gated_delta_triton)
torch.library.register_kernel("mom::chunk_gated_delta_backward", "cuda", chunk_gated_delta_backward_triton)
