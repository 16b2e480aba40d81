"""The Triton CUDA kernels of `mom::chunk_gated_delta` and `mom::chunk_gated_delta_backward`: the
chunked (WY) form of the gated delta rule (docs/math.md#the-chunked-form), split by what each
stage depends on.

Forward (kernels in `chunk_gated_delta_triton_fwd.py`):
  1. wy_solve, per (chunk, head): T = (I + A)^{-1}, by blocked forward substitution;
  2. wy_apply, per (chunk, head): W and U, once for all V-blocks;
  3. state_fwd, per (segment, head, V-block): the sequential pass over the segment's chunks, which
     saves each chunk's start state and Vn = U - W S0;
  4. output, per (chunk, head, V-block): O from the start state and Vn.
Backward (`chunk_gated_delta_triton_bwd.py`) recomputes 1-3 (only 1-2, W alone, when handed the
training forward's residuals, the chunk start states and Vn) and runs dvn_local, state_bwd (the
reverse sequential pass), grad_qkw and wy_bwd.

Chunks never cross a segment boundary. The chunk table (segment id and first row of every chunk,
and the segments longest first for the sequential passes) is built on the device from `offsets` in
one launch; its length, ceil(N / CHUNK) + S, bounds the real chunk count from the shapes alone, so
nothing syncs with the host (the unused slots are marked and their programs exit at once).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import chunk_gated_delta_triton_bwd as bwd
from . import chunk_gated_delta_triton_fwd as fwd
from . import pdl
from .chunk_gated_delta import CHUNK_SIZE as CHUNK
from .chunk_gated_delta import (
    check_residuals,
    chunk_slots,
    operand_dtype,
    reference_backward,
    reference_forward,
    reference_forward_train,
    residual_shapes,
    state_dtype,
)
from .precision import compute_dtype
from .triton_precision import compute_type, split_scale


def _precision(q_dtype: torch.dtype, states: torch.dtype) -> tuple[dict, torch.dtype]:
    """(constexprs, dtype of the products' operands) for inputs in q_dtype and states in `states`.
    COMPUTE: the precision rule's accumulation type. DOT: the operand dtype of the big products
    (bf16 and fp16 inputs feed the tensor cores as they are; float32 inputs run as tf32x3, about
    float32 accuracy). PREC32: products whose operands are float32 by construction (T and its
    gradient): plain tf32 is enough next to bf16 operands, tf32x3 for float32 inputs."""
    compute = compute_type(q_dtype, states)
    if compute == tl.float64:
        kw = dict(COMPUTE=compute, DOT=tl.float64, PREC="ieee", PREC32="ieee")
    elif q_dtype == torch.float32:
        kw = dict(COMPUTE=compute, DOT=tl.float32, PREC="tf32x3", PREC32="tf32x3")
    else:
        kw = dict(COMPUTE=compute, DOT=tl.bfloat16 if q_dtype == torch.bfloat16 else tl.float16, PREC="tf32",
                  PREC32="tf32")
    return kw, operand_dtype(q_dtype, states)


TABLE_SLOTS, TABLE_SEGMENTS = 32, 8  # the table kernel's slots a program and segments a step (its
                                    # work a step is their product; benchmarks/RESULTS.md#why-these-defaults)


@triton.jit
def _chunk_table_kernel(offsets, starts, table, order, n_seg, max_chunks, C: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Each chunk slot's (segment or -1, first row; 0 past the chunk count, where no kernel reads
    it), and from program 0 `chunk_starts`: starts[s + 1] = starts[s] + ceil(len_s / C). Every
    program runs that sum itself, a tile of segments at a time, and counts for each of its slots the
    segments whose chunks all come before it (its segment) and those chunks (its segment's first
    slot). The same indices, read as segments, get their place in `order`: segments by descending
    chunk count, ties in index order (there are at least as many slots as segments)."""
    pdl.enter(PDL)
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    seg = tl.zeros((BLOCK,), dtype=tl.int64)
    first_slot = tl.zeros((BLOCK,), dtype=tl.int64)
    mine = slot < n_seg  # `slot` read as a segment index
    my_count = (tl.load(offsets + slot + 1, mask=mine, other=0) - tl.load(offsets + slot, mask=mine, other=0)
                + C - 1) // C
    rank = tl.zeros((BLOCK,), dtype=tl.int64)
    carry = tl.zeros((1,), dtype=tl.int64)
    lead = tl.program_id(0) == 0
    tl.store(starts + tl.arange(0, 1), carry, mask=lead & (tl.arange(0, 1) == 0))
    for s0 in range(0, n_seg, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < n_seg
        length = tl.load(offsets + s + 1, mask=ok, other=0) - tl.load(offsets + s, mask=ok, other=0)
        counts = (length + C - 1) // C
        ends = carry + tl.cumsum(counts, axis=0)  # starts[s + 1]
        tl.store(starts + 1 + s, ends, mask=ok & lead)
        before = ok[None, :] & (ends[None, :] <= slot[:, None])  # [slots, segments]
        seg += tl.sum(before.to(tl.int64), axis=1)
        first_slot += tl.sum(tl.where(before, counts[None, :], 0), axis=1)
        ahead = (counts[None, :] > my_count[:, None]) | ((counts[None, :] == my_count[:, None])
                                                         & (s[None, :] < slot[:, None]))
        rank += tl.sum((ok[None, :] & ahead).to(tl.int64), axis=1)
        carry += tl.sum(counts, axis=0)
    real = seg < n_seg
    first = tl.load(offsets + tl.minimum(seg, n_seg - 1)) + (slot - first_slot) * C
    ok = slot < max_chunks
    tl.store(table + 2 * slot, tl.where(real, seg, -1), mask=ok)
    tl.store(table + 2 * slot + 1, tl.where(real, first, 0), mask=ok)
    tl.store(order + rank, slot, mask=mine)


def chunk_table(offsets: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """([max_chunks, 2] int64 (segment or -1, first row) per chunk slot, `chunk_starts` [S + 1],
    the segments longest first [S] (the sequential passes start the longest ones first, so that
    the short ones fill the machine at the end), max_chunks), in one launch."""
    n_seg = offsets.shape[0] - 1
    max_chunks = chunk_slots(n_rows, n_seg)
    starts = torch.empty(n_seg + 1, dtype=torch.int64, device=offsets.device)
    table = torch.empty(max_chunks, 2, dtype=torch.int64, device=offsets.device)
    order = torch.empty(n_seg, dtype=torch.int64, device=offsets.device)
    _chunk_table_kernel[(triton.cdiv(max_chunks, TABLE_SLOTS),)](offsets, starts, table, order, n_seg,
                                                                max_chunks, C=CHUNK, BLOCK=TABLE_SLOTS,
                                                                BLOCK_S=TABLE_SEGMENTS,
                                                                **pdl.launch_options(offsets.device))
    return table, starts, order, max_chunks


@triton.jit
def _zero_tail_kernel(x, bounds, n_seg, numel, ROW: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Zero x's elements in rows (first-dim entries) from bounds[n_seg] on, which no kernel writes.
    Only the device knows where that tail starts, so a fixed grid strides over it (no program per
    element of x)."""
    pdl.enter(PDL)
    end = tl.load(bounds + n_seg) * ROW
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for first in range(end + tl.program_id(0) * BLOCK, numel, step):
        idx = first + tl.arange(0, BLOCK)
        tl.store(x + idx, tl.zeros((BLOCK,), dtype=x.dtype.element_ty), mask=idx < numel)


def _zero_tail(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """x with its rows from bounds[-1] on cleared: only those, since the kernels write all the
    others and a whole-tensor zero-fill is a pass over memory."""
    block, max_programs = 1024, 1024
    if x.numel():
        _zero_tail_kernel[(min(triton.cdiv(x.numel(), block), max_programs),)](
            x, bounds, bounds.shape[0] - 1, x.numel(), ROW=x[0].numel(), BLOCK=block,
            **pdl.launch_options(x.device))
    return x


def _empty_like_rows(offsets: torch.Tensor, *likes: torch.Tensor) -> list[torch.Tensor]:
    """Outputs shaped like `likes` [N, ...] whose rows in no segment (those past offsets[-1]; the
    contract has offsets[0] = 0) read 0."""
    return [_zero_tail(torch.empty_like(x), offsets) for x in likes]


WIDE_STATE_BV = 64  # the state slices' width for 2-byte operands at K > 128 where programs fill the SMs


@functools.cache
def _sm_count(device: torch.device) -> int | None:
    """The device's SM count; None where no GPU runs the kernels (CPU tensors, the interpreter)."""
    if device.type != "cuda" or triton.knobs.runtime.interpret:
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def few_programs(segments: int, heads: int, dv: int, device: torch.device) -> bool:
    """Whether state passes on [K, WIDE_STATE_BV] slices, one program a (segment, head, slice),
    would have fewer programs than the device has SMs (False where no GPU runs the kernels)."""
    sms = _sm_count(device)
    return sms is not None and segments * heads * triton.cdiv(dv, WIDE_STATE_BV) < sms


def default_config(dk: int, dv: int, elem_bytes: int, few_programs: bool = False) -> dict:
    """Tile sizes and warps (why these: benchmarks/RESULTS.md#why-these-defaults). bk, bv: K- and
    V-blocks of the per-chunk kernels, 32 for 4- and 8-byte operands so that grad_qkw fits shared
    memory. state_bv, state_warps, state_bwd_warps: the sequential passes keep the whole [K, state_bv]
    state slice in registers, one program per (segment, head, V-block), on state_warps forward and
    state_bwd_warps backward. state_stages: software-pipelining depth of
    their loop over chunks (2 only for 2-byte inputs: wider ones overflow Hopper's shared memory).
    warps, bwd_warps: the per-chunk kernels of the forward and of the backward, 4 for 2-byte inputs
    (faster), 8 for wider ones; qkw_bk, qkw_warps: grad_qkw's own K-block and warps (128 on 8 warps
    for 2-byte inputs); solve_warps: the triangular solve's. few_programs: [K, 64] slices would
    leave SMs idle (a batch-1 prefill, one long sequence), where narrower ones shorten each chunk
    step. Only these configurations are verified on Hopper; some others raised illegal memory
    accesses."""
    block_k = max(16, triton.next_power_of_2(dk))
    tile = 64 if elem_bytes <= 2 else 32
    if block_k <= 128:
        state_bv, state_warps, state_bwd_warps = min(64, max(16, triton.next_power_of_2(dv))), 4, 4
    elif elem_bytes > 2:
        state_bv, state_warps, state_bwd_warps = 16, 4, 4
    else:
        state_bv, state_warps, state_bwd_warps = (32, 4, 8) if few_programs else (WIDE_STATE_BV, 8, 8)
    chunk_warps = 4 if elem_bytes <= 2 else 8
    bk = min(tile, block_k)
    return dict(bk=bk, bv=min(tile, max(16, triton.next_power_of_2(dv))),
                state_bv=state_bv, state_warps=state_warps, state_bwd_warps=state_bwd_warps,
                state_stages=2 if elem_bytes <= 2 else 1,
                warps=chunk_warps, solve_warps=1, bwd_warps=chunk_warps,
                qkw_bk=min(128, block_k) if elem_bytes <= 2 else bk, qkw_warps=8)


class _Plan:
    """Shapes, dtypes, chunk table and tile sizes shared by the launches of one call."""

    def __init__(self, q, v, offsets, initial_state, config):
        self.n, self.h, self.dk = q.shape
        self.dv = v.shape[-1]
        self.n_seg = offsets.shape[0] - 1
        self.state_dtype = state_dtype(q, initial_state)
        self.kw, self.dot_dtype = _precision(q.dtype, self.state_dtype)
        self.compute_dtype = compute_dtype(q.dtype, self.state_dtype)
        self.cfg = config
        self.launch = pdl.launch_options(q.device)
        self.block_k = max(16, triton.next_power_of_2(self.dk))
        self.empty = self.n_seg * self.h * self.dk * self.dv == 0
        if not self.empty:
            self.table, self.chunk_starts, self.order, self.max_chunks = chunk_table(offsets, self.n)

    def new(self, *shape, dtype=None):
        return torch.empty(*shape, dtype=dtype or self.compute_dtype, device=self.table.device)

    def dims(self):
        return dict(H=self.h, K=self.dk, V=self.dv, C=CHUNK)

    def state_grid(self) -> tuple[int]:
        """The sequential passes' grid: one program per (segment, head, V-block)."""
        return (self.n_seg * self.h * triton.cdiv(self.dv, self.cfg["state_bv"]),)


def _wy(p: _Plan, k, v, g, beta, offsets, with_u: bool):
    """Stages 1-2: T [N, H, C], W [N, H, K], with_u U [N, H, V] (else None), and the decays of the
    sequential passes (`store_decays`: [N, H, 2] per row, [slots, H] per chunk)."""
    kw, cfg = p.kw, p.cfg
    t_buf = p.new(p.n, p.h, CHUNK)
    w = p.new(p.n, p.h, p.dk, dtype=p.dot_dtype)
    u = p.new(p.n, p.h, p.dv, dtype=p.dot_dtype) if with_u else None
    decays, last_decay = p.new(p.n, p.h, 2), p.new(p.max_chunks, p.h)
    grid = (p.max_chunks, p.h)
    fwd.wy_solve_kernel[grid](k, g, beta, offsets, p.table, t_buf, H=p.h, K=p.dk, C=CHUNK, BK=cfg["bk"],
                              **kw, **p.launch, num_warps=cfg["solve_warps"])
    fwd.wy_apply_kernel[grid](k, v, g, beta, offsets, p.table, t_buf, w, w if u is None else u, decays,
                              last_decay, **p.dims(), BK=cfg["bk"], BV=cfg["bv"], COMPUTE=kw["COMPUTE"],
                              DOT=kw["DOT"], PREC=kw["PREC"], WITH_U=with_u, **p.launch,
                              num_warps=cfg["warps"])
    return t_buf, w, u, (decays, last_decay)


def _forward_states(p: _Plan, q, k, v, g, beta, offsets, initial_state, final):
    """Stages 1-3: T [N, H, C], W [N, H, K], chunk start states h_buf [slots, H, K, V], Vn [N, H, V]
    (both in the residuals' layout, their unwritten slots and rows not cleared), the decays; writes
    the final states."""
    kw, cfg = p.kw, p.cfg
    t_buf, w, u, decays = _wy(p, k, v, g, beta, offsets, with_u=True)
    h_buf = p.new(p.max_chunks, p.h, p.dk, p.dv, dtype=p.dot_dtype)
    v_new = p.new(p.n, p.h, p.dv, dtype=p.dot_dtype)
    init = final if initial_state is None else initial_state.contiguous()  # placeholder if absent
    fwd.state_fwd_kernel[p.state_grid()](
        k, *decays, w, u, offsets, p.order, p.chunk_starts, init, h_buf, v_new, final, **p.dims(),
        BLOCK_K=p.block_k, BV=cfg["state_bv"], HAS_INIT=initial_state is not None, COMPUTE=kw["COMPUTE"],
        DOT=kw["DOT"], PREC=kw["PREC"], STAGES=cfg["state_stages"], **p.launch, num_warps=cfg["state_warps"])
    return t_buf, w, h_buf, v_new, decays


def _prepare(q, k, v, g, beta, offsets, initial_state, config):
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    offsets = offsets.to(torch.int64).contiguous()
    _, dot_dtype = _precision(q.dtype, state_dtype(q, initial_state))
    few = few_programs(offsets.shape[0] - 1, q.shape[1], v.shape[-1], q.device)
    cfg = dict(default_config(q.shape[-1], v.shape[-1], dot_dtype.itemsize, few), **(config or {}))
    return (q, k, v, g, beta, offsets), _Plan(q, v, offsets, initial_state, cfg)


def _forward(q, k, v, g, beta, offsets, initial_state, scale, config, residuals: bool):
    """(o, final state) and, with residuals, the chunk start states and Vn in the residuals'
    layout (`residual_shapes`), their unused slots and rows cleared."""
    (q, k, v, g, beta, offsets), p = _prepare(q, k, v, g, beta, offsets, initial_state, config)
    final = torch.empty(p.n_seg, p.h, p.dk, p.dv, dtype=p.state_dtype, device=q.device)
    if p.empty:
        outs = torch.zeros_like(v), final
        if residuals:
            outs += tuple(torch.zeros(shape, dtype=p.dot_dtype, device=q.device)
                          for shape in residual_shapes(p.n, p.n_seg, p.h, p.dk, p.dv))
        return outs
    (o,) = _empty_like_rows(offsets, v)
    _, _, h_buf, v_new, _ = _forward_states(p, q, k, v, g, beta, offsets, initial_state, final)
    kw = p.kw
    fwd.output_kernel[(p.max_chunks * triton.cdiv(p.dv, p.cfg["bv"]), p.h)](
        q, k, g, offsets, p.table, h_buf, v_new, o, *split_scale(scale), **p.dims(), BK=p.cfg["bk"],
        BV=p.cfg["bv"], COMPUTE=kw["COMPUTE"], DOT=kw["DOT"], PREC=kw["PREC"], **p.launch,
        num_warps=p.cfg["warps"])
    if residuals:
        return o, final, _zero_tail(h_buf, p.chunk_starts), _zero_tail(v_new, offsets)
    return o, final


def chunk_gated_delta_triton(q, k, v, g, beta, offsets, initial_state, scale, config: dict | None = None):
    """Same contract as `mom::chunk_gated_delta`: (o [N, H, V] in v's dtype, final state
    [S, H, K, V] in `state_dtype(q, initial_state)`)."""
    return _forward(q, k, v, g, beta, offsets, initial_state, scale, config, residuals=False)


def chunk_gated_delta_train_triton(q, k, v, g, beta, offsets, initial_state, scale,
                                   config: dict | None = None):
    """Same contract as `mom::chunk_gated_delta_train`: (o, final state, chunk start states, Vn)."""
    return _forward(q, k, v, g, beta, offsets, initial_state, scale, config, residuals=True)


def chunk_gated_delta_backward_triton(q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final,
                                      starts=None, v_new=None, config: dict | None = None):
    """Same contract as `mom::chunk_gated_delta_backward`: (dq, dk, dv, dg, dbeta, d_initial); the
    training forward's residuals starts and v_new, when given, replace the recomputed ones."""
    (q, k, v, g, beta, offsets), p = _prepare(q, k, v, g, beta, offsets, initial_state, config)
    d_o = d_o.contiguous()
    d_init = torch.empty(p.n_seg, p.h, p.dk, p.dv, dtype=p.state_dtype, device=q.device)
    if p.empty:  # nothing to scan: every gradient is 0
        return (*(torch.zeros_like(x) for x in (q, k, v, g, beta)), d_init.zero_())
    dq, dk, dv, dg, dbeta = _empty_like_rows(offsets, q, k, v, g, beta)
    if starts is None:
        t_buf, w, h_buf, v_new, decays = _forward_states(p, q, k, v, g, beta, offsets, initial_state,
                                                         torch.empty_like(d_init))
    else:  # the kernels index the residuals as contiguous buffers
        t_buf, w, _, decays = _wy(p, k, v, g, beta, offsets, with_u=False)
        h_buf, v_new = starts.contiguous(), v_new.contiguous()
    kw, dims, cfg = p.kw, p.dims(), p.cfg
    dot_kw = dict(COMPUTE=kw["COMPUTE"], DOT=kw["DOT"], PREC=kw["PREC"])
    scale2 = split_scale(scale)
    grid = (p.max_chunks, p.h)
    d_vn = p.new(p.n, p.h, p.dv, dtype=p.dot_dtype)
    bwd.dvn_local_kernel[grid](q, k, g, offsets, p.table, d_o, d_vn, *scale2, **dims, BK=cfg["bk"],
                               BV=cfg["bv"], **dot_kw, **p.launch, num_warps=cfg["warps"])
    dh_buf = torch.empty_like(h_buf)
    dfin = d_init if d_final is None else d_final.contiguous()  # placeholder if absent
    bwd.state_bwd_kernel[p.state_grid()](
        q, k, *decays, w, d_o, offsets, p.order, p.chunk_starts, dfin, dh_buf, d_vn, d_init, *scale2, **dims,
        BLOCK_K=p.block_k, BV=cfg["state_bv"], HAS_DFINAL=d_final is not None, **dot_kw,
        STAGES=cfg["state_stages"], **p.launch, num_warps=cfg["state_bwd_warps"])
    n_kb = triton.cdiv(p.dk, cfg["qkw_bk"])
    dk_part = p.new(p.n, p.h, p.dk)
    dw = p.new(p.n, p.h, p.dk, dtype=p.dot_dtype)
    dg_part = p.new(n_kb, p.n, p.h)
    bwd.grad_qkw_kernel[(p.max_chunks * n_kb, p.h)](
        q, k, g, offsets, p.table, d_o, h_buf, dh_buf, v_new, d_vn, dq, dk_part, dw, dg_part, *scale2,
        p.n, **dims, BK=cfg["qkw_bk"], BV=cfg["bv"], **dot_kw, **p.launch, num_warps=cfg["qkw_warps"])
    bwd.wy_bwd_kernel[grid](
        k, v, g, beta, offsets, p.table, t_buf, dw, d_vn, dk_part, dg_part, dk, dv, dg, dbeta, p.n,
        **dims, BK=cfg["bk"], BV=cfg["bv"], N_KB=n_kb, **kw, **p.launch, num_warps=cfg["bwd_warps"])
    return dq, dk, dv, dg, dbeta, d_init


# Head sizes the kernels are verified for on Hopper (tests/test_triton_kernels.py). Smaller or
# in-between sizes are zero-padded up to the next verified one, which is exact: zero key/query
# columns add nothing to any product and zero value columns stay zero in the state and the output.
# Only heads wider than every verified size run the PyTorch reference (which syncs with the host).
# Padding rather than an unverified launch: head_dim 8 (below tl.dot's 16) faulted on the GPU.
VERIFIED_K = (64, 128, 256)
VERIFIED_V = (64, 128, 256, 512)


def _padded_sizes(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int] | None:
    """The verified (K, V) the kernels run these heads at, or None when a head is too wide."""
    pk = next((size for size in VERIFIED_K if size >= k.shape[-1]), None)
    pv = next((size for size in VERIFIED_V if size >= v.shape[-1]), None)
    return None if pk is None or pv is None else (pk, pv)


def _pad(x: torch.Tensor | None, *sizes: int) -> torch.Tensor | None:
    """Zero-pad the trailing dims of x up to sizes (a no-op at the verified sizes)."""
    if x is None:
        return None
    widths = [w for size, dim in zip(reversed(sizes), reversed(x.shape)) for w in (0, size - dim)]
    return torch.nn.functional.pad(x, widths) if any(widths) else x


def _unpad(x: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The leading `sizes` of x's trailing dims, contiguous (the ops' outputs are)."""
    index = (..., *(slice(0, size) for size in sizes))
    return x[index].contiguous()


def _forward_cuda(q, k, v, g, beta, offsets, initial_state, scale, residuals: bool):
    sizes = _padded_sizes(k, v)
    if sizes is None:
        reference = reference_forward_train if residuals else reference_forward
        return reference(q, k, v, g, beta, offsets, initial_state, scale)
    pk, pv = sizes
    dk, dv = k.shape[-1], v.shape[-1]
    launch = chunk_gated_delta_train_triton if residuals else chunk_gated_delta_triton
    o, final, *kept = launch(_pad(q, pk), _pad(k, pk), _pad(v, pv), g, beta, offsets,
                             _pad(initial_state, pk, pv), scale)
    outs = _unpad(o, dv), _unpad(final, dk, dv)
    if kept:
        starts, v_new = kept
        outs += _unpad(starts, dk, dv), _unpad(v_new, dv)
    return outs


def chunk_gated_delta_cuda(q, k, v, g, beta, offsets, initial_state, scale):
    """The op's CUDA kernel: `chunk_gated_delta_triton` at the verified head sizes."""
    return _forward_cuda(q, k, v, g, beta, offsets, initial_state, scale, residuals=False)


def chunk_gated_delta_train_cuda(q, k, v, g, beta, offsets, initial_state, scale):
    """The training op's CUDA kernel: `chunk_gated_delta_train_triton` at the verified head sizes."""
    return _forward_cuda(q, k, v, g, beta, offsets, initial_state, scale, residuals=True)


def chunk_gated_delta_backward_cuda(q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final,
                                    starts=None, v_new=None):
    """The backward op's CUDA kernel: `chunk_gated_delta_backward_triton` at the verified head sizes."""
    check_residuals(q, v, offsets, initial_state, starts, v_new)
    sizes = _padded_sizes(k, v)
    if sizes is None:
        return reference_backward(q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final)
    pk, pv = sizes
    dk, dv = k.shape[-1], v.shape[-1]
    dq, dk_, dv_, dg, dbeta, d_init = chunk_gated_delta_backward_triton(
        _pad(q, pk), _pad(k, pk), _pad(v, pv), g, beta, offsets, _pad(initial_state, pk, pv), scale,
        _pad(d_o, pv), _pad(d_final, pk, pv), _pad(starts, pk, pv), _pad(v_new, pv))
    return _unpad(dq, dk), _unpad(dk_, dk), _unpad(dv_, dv), dg, dbeta, _unpad(d_init, dk, dv)
