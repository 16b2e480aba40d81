"""`mom::chunk_gated_delta`: the gated delta rule over packed variable-length segments.

Rows 0..N-1 of q/k/v/g/beta are packed segments: segment s is rows offsets[s]..offsets[s+1]-1 in
time order, with its own state (initial_state[s], or zero) and its own final state. Rows at or past
offsets[-1] belong to no segment: their output is zero and they change nothing. Each segment obeys
the per-token recurrence of `gated_delta_step.py`; this file computes the same function
chunk-parallel (docs/math.md#the-chunked-form).

Chunked form (one chunk of C rows, cumulative log-decay G_i = g_1 + ... + g_i, start state S0):
    u_i = beta_i (v_i - e^{G_i} S0^T k_i - sum_{j<i} e^{G_i-G_j} (k_i.k_j) u_j)
  so U = (I + L)^{-1} diag(beta) (V - diag(e^G) K S0), L_ij = beta_i e^{G_i-G_j} k_i.k_j (j < i);
    o_i = scale (e^{G_i} S0^T q_i + sum_{j<=i} e^{G_i-G_j} (q_i.k_j) u_j)
    S_C = e^{G_C} S0 + K^T diag(e^{G_C-G}) U

`mom::chunk_gated_delta_train` is the same forward for autograd: it also returns the residuals its
backward would otherwise recompute, each chunk's start state S0 and the u_i (the kernels' Vn), in
the layout of `residual_shapes`.
"""
from __future__ import annotations

import torch

from ._checks import (
    STATE_DTYPES,
    check_bool,
    check_float,
    check_offsets,
    check_rows,
    check_same_device,
    check_tensor,
    needs_autograd,
)
from .direct_call import call
from .gated_delta_step import step_backward_reference, step_reference
from .precision import compute_dtype

CHUNK_SIZE = 64  # the kernels' chunk and the residuals' (any chunk size computes the same function)


def state_dtype(q: torch.Tensor, initial_state: torch.Tensor | None) -> torch.dtype:
    """The dtype of the final state and its gradient: the initial state's, else the inputs' compute
    dtype (float32, float64 for float64 inputs). Every kernel of the op follows this."""
    return compute_dtype(q.dtype) if initial_state is None else initial_state.dtype


def operand_dtype(q_dtype: torch.dtype, states: torch.dtype) -> torch.dtype:
    """The dtype of the scan's product operands, and so of its residuals, for inputs in q_dtype and
    states in `states`: the inputs' dtype, or float64 when the arithmetic is float64."""
    return torch.float64 if compute_dtype(q_dtype, states) == torch.float64 else q_dtype


def chunk_starts(offsets: torch.Tensor) -> torch.Tensor:
    """[S + 1] int64: the slot of each segment's first chunk (segments' chunks are numbered
    consecutively in segment order), then the number of chunks."""
    counts = (offsets.diff() + CHUNK_SIZE - 1) // CHUNK_SIZE
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def chunk_slots(n: int, n_seg: int) -> int:
    """ceil(N / C) + S: a bound on the chunk count of N rows in S segments from the shapes alone."""
    return -(-n // CHUNK_SIZE) + n_seg


def residual_shapes(n: int, n_seg: int, h: int, dk: int, dv: int) -> tuple[tuple, tuple]:
    """Shapes of the residuals of N rows in S segments: the chunk start states [slots, H, K, V]
    (chunk c of segment s in slot chunk_starts[s] + c; slots past the chunk count read 0) and
    the u_i [N, H, V] (rows in no segment read 0)."""
    return (chunk_slots(n, n_seg), h, dk, dv), (n, h, dv)


def check_residuals(q, v, offsets, initial_state, starts, v_new) -> None:
    """The backward op's residuals: both or neither, in `residual_shapes` and `operand_dtype` (the
    kernels read them by those shapes, so anything else is refused before a launch)."""
    if (starts is None) != (v_new is None):
        raise ValueError("starts, v_new: expected both (the training forward's residuals) or neither")
    if starts is None:
        return
    shapes = residual_shapes(q.shape[0], offsets.shape[0] - 1, q.shape[1], q.shape[2], v.shape[2])
    dtype = operand_dtype(q.dtype, state_dtype(q, initial_state))
    for name, t, shape in zip(("starts", "v_new"), (starts, v_new), shapes):
        check_tensor(name, t, shape=shape, dtypes=(dtype,))


def _segment_grid(offsets: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row index [S, L] and validity mask [S, L] laying each segment out on a padded grid whose
    length L is the longest segment rounded up to the chunk size. Reads the offsets' values: this
    is the host-side reference kernel, never traced by the compiler."""
    lengths = offsets.diff()
    longest = int(lengths.max()) if lengths.numel() else 0
    padded = -(-longest // chunk_size) * chunk_size
    pos = torch.arange(padded, device=offsets.device)
    valid = pos[None, :] < lengths[:, None]
    rows = torch.where(valid, offsets[:-1, None] + pos[None, :], 0)
    return rows, valid


def _to_grid(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, dt: torch.dtype):
    """Packed [N, H, ...] -> grid [S, H, L, ...] with zeros at padding (which makes padding a no-op:
    g = beta = k = 0 leaves the state unchanged)."""
    grid = x.to(dt)[rows] * valid.reshape(*valid.shape, *([1] * (x.dim() - 1)))
    return grid.movedim(2, 1)


def _from_grid(grid: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, n: int):
    """Grid [S, H, L, ...] -> packed [N, H, ...]; rows outside every segment stay zero."""
    flat = (grid.movedim(1, 2) * valid.reshape(*valid.shape, *([1] * (grid.dim() - 2))))
    out = flat.new_zeros(n, *flat.shape[2:])
    return out.index_add_(0, rows.flatten(), flat.flatten(0, 1))


def chunk_reference(
    q, k, v, g, beta, offsets, initial_state, scale: float, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk-parallel forward. Returns (o [N, H, V] in the compute dtype, final state
    [S, H, K, V], chunk start states [S, H, n_chunks, K, V], the u_i [N, H, V]); computes in
    float32, or float64 when the inputs or the initial state are float64 (as every kernel does)."""
    dt = compute_dtype(q.dtype, state_dtype(q, initial_state))
    n, h, dk = k.shape
    dv = v.shape[-1]
    n_seg = offsets.numel() - 1
    rows, valid = _segment_grid(offsets, chunk_size)
    n_chunks = rows.shape[1] // chunk_size

    def chunked(x):
        g_ = _to_grid(x, rows, valid, dt)
        return g_.reshape(n_seg, h, n_chunks, chunk_size, *g_.shape[3:])

    qc, kc, vc, gc, bc = (chunked(t) for t in (q, k, v, g, beta))
    cum = gc.cumsum(-1)
    idx = torch.arange(chunk_size, device=q.device)
    lower_incl = idx[:, None] >= idx[None, :]
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower_incl, float("-inf")).exp()
    strict = decay.masked_fill(torch.eye(chunk_size, dtype=torch.bool, device=q.device), 0.0)
    system = torch.eye(chunk_size, dtype=dt, device=q.device) + (
        bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * strict)
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # noqa: E731
    w_v = solve(bc[..., None] * vc)
    w_k = solve((bc * cum.exp())[..., None] * kc)
    k_to_end = kc * (cum[..., -1:] - cum).exp()[..., None]

    state = (torch.zeros(n_seg, h, dk, dv, dtype=dt, device=q.device)
             if initial_state is None else initial_state.to(dt, copy=True))
    starts, us = [], []
    for c in range(n_chunks):
        starts.append(state)
        u = w_v[:, :, c] - w_k[:, :, c] @ state
        us.append(u)
        state = cum[:, :, c, -1].exp()[..., None, None] * state + k_to_end[:, :, c].transpose(-1, -2) @ u
    if n_chunks == 0:
        starts_t = state.new_zeros(n_seg, h, 0, dk, dv)
        return q.new_zeros(n, h, dv, dtype=dt), state, starts_t, q.new_zeros(n, h, dv, dtype=dt)
    starts_t = torch.stack(starts, 2)
    u_all = torch.stack(us, 2)
    o = scale * ((qc * cum.exp()[..., None]) @ starts_t
                 + ((qc @ kc.transpose(-1, -2)) * decay) @ u_all)
    o = _from_grid(o.flatten(2, 3), rows, valid, n)
    return o, state, starts_t, _from_grid(u_all.flatten(2, 3), rows, valid, n)


def chunk_backward_reference(
    q, k, v, g, beta, offsets, initial_state, scale: float, d_o, d_final,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `chunk_reference`: the chunk start states are recomputed, then each chunk's
    tokens are replayed forward and walked backward with the per-token formulas of
    `gated_delta_step.py`. Returns (dq, dk, dv, dg, dbeta, d_initial_state)."""
    dt = compute_dtype(q.dtype, state_dtype(q, initial_state))
    n = k.shape[0]
    _, final, starts, _ = chunk_reference(q, k, v, g, beta, offsets, initial_state, scale, chunk_size)
    rows, valid = _segment_grid(offsets, chunk_size)
    grids = [_to_grid(t, rows, valid, dt) for t in (q, k, v, g, beta, d_o)]
    d_state = torch.zeros_like(final) if d_final is None else d_final.to(dt, copy=True)
    grads = [torch.zeros_like(t) for t in grids[:5]]
    for c in reversed(range(starts.shape[2])):
        span = range(c * chunk_size, (c + 1) * chunk_size)
        before = [starts[:, :, c]]
        for t in span[:-1]:
            before.append(step_reference(*(x[:, :, t] for x in grids[:5]), before[-1], scale)[1])
        for t, s_prev in zip(reversed(span), reversed(before)):
            *token_grads, d_state = step_backward_reference(
                *(x[:, :, t] for x in grids[:5]), s_prev, scale, grids[5][:, :, t], d_state)
            for acc, gr in zip(grads, token_grads):
                acc[:, :, t] = gr
    packed = [_from_grid(gr, rows, valid, n) for gr in grads]
    return (*packed, d_state)


def reference_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    offsets: torch.Tensor, initial_state: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel: `chunk_reference` with the op's output dtypes."""
    o, final, _, _ = chunk_reference(q, k, v, g, beta, offsets, initial_state, scale)
    return o.to(v.dtype), final.to(state_dtype(q, initial_state))


chunk_gated_delta_op = torch.library.custom_op("mom::chunk_gated_delta", mutates_args=())(reference_forward)


def _forward_fake(q, k, v, g, beta, offsets, initial_state, scale):
    n_seg = offsets.shape[0] - 1
    final = q.new_empty(n_seg, q.shape[1], q.shape[2], v.shape[2], dtype=state_dtype(q, initial_state))
    return v.new_empty(v.shape), final


chunk_gated_delta_op.register_fake(_forward_fake)


def reference_forward_train(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    offsets: torch.Tensor, initial_state: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training op's reference kernel: (o, final state, chunk start states, u_i), the last two
    in `residual_shapes`' layout and `operand_dtype`."""
    o, final, starts, v_new = chunk_reference(q, k, v, g, beta, offsets, initial_state, scale)
    n, h, dk = k.shape
    n_seg = offsets.numel() - 1
    starts_shape, _ = residual_shapes(n, n_seg, h, dk, v.shape[-1])
    first = chunk_starts(offsets)
    chunk = torch.arange(starts.shape[2], device=q.device)
    real = chunk[None, :] < first.diff()[:, None]  # [S, n_chunks]: chunk c exists in segment s
    slots = (first[:-1, None] + chunk[None, :])[real]
    packed = starts.new_zeros(starts_shape)
    packed[slots] = starts.movedim(2, 1)[real]
    states = state_dtype(q, initial_state)
    dt = operand_dtype(q.dtype, states)
    return o.to(v.dtype), final.to(states), packed.to(dt), v_new.to(dt)


chunk_gated_delta_train_op = torch.library.custom_op(
    "mom::chunk_gated_delta_train", mutates_args=())(reference_forward_train)


@chunk_gated_delta_train_op.register_fake
def _(q, k, v, g, beta, offsets, initial_state, scale):
    o, final = _forward_fake(q, k, v, g, beta, offsets, initial_state, scale)
    starts_shape, rows_shape = residual_shapes(q.shape[0], offsets.shape[0] - 1, q.shape[1], q.shape[2],
                                               v.shape[2])
    dt = operand_dtype(q.dtype, state_dtype(q, initial_state))
    return o, final, q.new_empty(starts_shape, dtype=dt), q.new_empty(rows_shape, dtype=dt)


def reference_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    offsets: torch.Tensor, initial_state: torch.Tensor | None, scale: float,
    d_o: torch.Tensor, d_final: torch.Tensor | None,
    starts: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's reference kernel: `chunk_backward_reference` with the op's dtypes. starts
    and v_new: the training op's residuals, which a kernel may read instead of recomputing them
    (this one recomputes them, after the same checks)."""
    check_residuals(q, v, offsets, initial_state, starts, v_new)
    dq, dk, dv, dg, dbeta, d_init = chunk_backward_reference(
        q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            d_init.to(state_dtype(q, initial_state)))


chunk_gated_delta_backward_op = torch.library.custom_op(
    "mom::chunk_gated_delta_backward", mutates_args=())(reference_backward)


@chunk_gated_delta_backward_op.register_fake
def _(q, k, v, g, beta, offsets, initial_state, scale, d_o, d_final, starts=None, v_new=None):
    n_seg = offsets.shape[0] - 1
    d_init = q.new_empty(n_seg, q.shape[1], q.shape[2], v.shape[2], dtype=state_dtype(q, initial_state))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), d_init)


def _setup_context(ctx, inputs, output):
    """Both forward ops: the inputs, and the training op's residuals (outputs 2 and 3)."""
    q, k, v, g, beta, offsets, initial_state, scale = inputs
    residuals = output[2:]
    if residuals:
        ctx.mark_non_differentiable(*residuals)
    ctx.save_for_backward(q, k, v, g, beta, offsets, initial_state, *residuals)
    ctx.scale = scale


def _backward(ctx, d_o, d_final, *_):
    q, k, v, g, beta, offsets, initial_state, *residuals = ctx.saved_tensors
    if d_o is None:
        d_o = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, d_init = torch.ops.mom.chunk_gated_delta_backward(
        q, k, v, g, beta, offsets, initial_state, ctx.scale, d_o, d_final, *residuals)
    return dq, dk, dv, dg, dbeta, None, (None if initial_state is None else d_init), None


chunk_gated_delta_op.register_autograd(_backward, setup_context=_setup_context)
chunk_gated_delta_train_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_gated_delta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    offsets: torch.Tensor, initial_state: torch.Tensor | None = None, scale: float | None = None,
    keep_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over packed segments.

    q, k: [N, H, K]; v: [N, H, V]; g: [N, H] float32 (or float64) log-decay, finite, <= 0; beta: [N, H];
    offsets: [S + 1] int64, non-decreasing, offsets[0] = 0, offsets[-1] <= N;
    initial_state: [S, H, K, V] float32 (or float64) or None (zero). scale defaults to K ** -0.5.
    Returns (o [N, H, V] in v's dtype, final state [S, H, K, V] in `state_dtype`: the initial
    state's dtype, else float32, or float64 for float64 inputs).
    When a gradient will be needed it runs `mom::chunk_gated_delta_train`, which keeps the chunk
    start states and the u_i for the backward (H * (K * V / 64 + V) values a row, in
    `operand_dtype`: the inputs', float64 where the arithmetic is) instead of the backward
    recomputing them; keep_states=False runs `mom::chunk_gated_delta`
    and has the backward recompute them (less memory, one more sequential state pass).
    """
    n, h, dk, dv = check_rows(q, k, v, g, beta)
    check_offsets(offsets, n)
    if initial_state is not None:
        check_tensor("initial_state", initial_state,
                     shape=(offsets.shape[0] - 1, h, dk, dv), dtypes=STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, offsets=offsets, initial_state=initial_state)
    scale = dk ** -0.5 if scale is None else check_float("scale", scale)
    args = (q, k, v, g, beta, offsets, initial_state, scale)
    if check_bool("keep_states", keep_states) and needs_autograd(*args[:7]):
        return torch.ops.mom.chunk_gated_delta_train(*args)[:2]
    return call(chunk_gated_delta_op, *args)
