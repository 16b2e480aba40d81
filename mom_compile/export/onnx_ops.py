"""Translations of the `mom` custom ops to standard ONNX ops, for torch.onnx's dynamo exporter.

Each function below receives the exporter's symbolic values for one op call and records ONNX ops
through onnxscript in trace mode, computing what the op's PyTorch reference computes (the
docstrings of mom_compile/ops/*.py are the contract). They run on stock onnxruntime:

- dispatch: a stable sort as TopK over the unique keys segment * N + choice (ties impossible, so
  stability is automatic), its inverse by a second TopK, segment sizes by comparing each choice
  with each memory, offsets by CumSum.
- segment_conv: the reference's gather formulation: every output row reads W rows of the table
  [x ; history ; 0], so no tap ever crosses a segment boundary.
- chunk_gated_delta: the segments laid out time-major on a padded [L, S] grid (L = the longest
  segment). Padding cells get beta = 0 and g = 0, which leaves the state unchanged. The grid goes
  through one Scan over time whose body is the per-token gated delta step, or, from opset 27 on,
  through one standard LinearAttention(update_rule="gated_delta") node with the segments as its
  batch (float32 only: the op has no float64).
- gated_delta_step: the per-token formula once, or from opset 27 on LinearAttention with T = 1.
- combine: Gather of each token's k rows and their weighted sum.
- memory_decode (the decode step, functional form): the rows' composition, and the new state
  tables by a Where over slots; in plugin-mode exports, the nodes of its two TensorRT plugins.
No graph holds a scatter (ScatterND's result is undefined where indices repeat; ScatterElements'
reductions have had provider bugs).

Shapes are read with Shape at run time, so batch and sequence stay dynamic.
"""
import functools
from collections.abc import Callable
from typing import TypeVar, Union

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import DOUBLE, FLOAT
from onnxscript import opset18 as op

from ..ops.l2_normalize import L2_EPS
from ..ops.memory_decode import SOFTPLUS_THRESHOLD
from ..ops.precision import compute_dtype
from . import plugin
from .tensorrt_plugin import CONV, STEP

# The scripted functions' type: the state's (float32, or float64 for a float64 model).
TState = TypeVar("TState", bound=Union[FLOAT, DOUBLE])  # noqa: UP007 (onnxscript reads typing.Union)

_INT64_MAX = 2 ** 63 - 1  # "to the end" for Slice


# -- small helpers ------------------------------------------------------------------------------
def _dim(x, axis: int):
    """Size of axis `axis` of x as an int64 scalar."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1))


_TORCH_OF_ONNX = {ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
                  ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64}


def _compute_type(x) -> ir.DataType:
    """The ops' precision rule (`compute_dtype`) for a float value x whose type the tracer knows."""
    if x.dtype not in _TORCH_OF_ONNX:
        raise TypeError(f"{x.name}: expected a float value of known type, got {x.dtype}")
    compute = compute_dtype(_TORCH_OF_ONNX[x.dtype])
    return next(onnx_type for onnx_type, dtype in _TORCH_OF_ONNX.items() if dtype == compute)


def _cast(x, dtype: ir.DataType):
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _scalar(value: float, like):
    """value in like's type, rounded once from the exact double (a Python float made into an ONNX
    float constant is first rounded to float32, which a float64 graph would inherit)."""
    return op.CastLike(op.Constant(value=ir.tensor(value, dtype=ir.DataType.DOUBLE)), like)


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _col(x):
    return op.Unsqueeze(x, [1])


def _row(x):
    return op.Unsqueeze(x, [0])


def _split_last(x, sizes: list[int]) -> list:
    """x's last axis cut into consecutive parts of the given sizes."""
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [op.Slice(x, _ints(end - size), _ints(end), _ints(-1)) for size, end in zip(sizes, ends)]


def _segment_of_rows(offsets, n):
    """(segment id [N] clamped to a real segment, in-segment mask [N], position inside it [N])
    of every packed row: the segment of row r is the number of segment ends <= r."""
    n_seg = op.Sub(_dim(offsets, 0), 1)
    rows = op.Range(0, n, 1)
    ends = op.Slice(offsets, [1], [_INT64_MAX])
    seg = op.ReduceSum(op.Cast(op.LessOrEqual(_row(ends), _col(rows)), to=ir.DataType.INT64), [1],
                       keepdims=0)
    in_segment = op.Less(seg, n_seg)
    seg = op.Min(seg, op.Sub(n_seg, 1))
    pos = op.Sub(rows, op.Gather(offsets, seg))
    return seg, in_segment, pos



# -- mom::dispatch ------------------------------------------------------------------------------
def dispatch(memory_idx, mask, num_memories: int):
    """(token_of_row [N], memory_of_row [N], row_of_choice [B, T, k], offsets [B*M + 1]), N = B*T*k."""
    shape = op.Shape(memory_idx)
    b = _dim(memory_idx, 0)
    k = _dim(memory_idx, 2)
    n_seg = op.Mul(b, num_memories)
    batch = op.Unsqueeze(op.Range(0, b, 1), [1, 2])
    in_range = op.Min(op.Max(memory_idx, op.Constant(value_int=0)), op.Constant(value_int=num_memories - 1))
    valid = op.And(op.Unsqueeze(mask, [2]), op.Equal(memory_idx, in_range))  # out of range: padding
    segment = op.Add(op.Mul(batch, num_memories), memory_idx)
    key = op.Reshape(op.Where(valid, segment, n_seg), [-1])
    n = _dim(key, 0)
    everything = op.Reshape(n, [1])
    unique = op.Add(op.Mul(key, n), op.Range(0, n, 1))  # distinct keys: the order of equal segments is time
    _, choice_of_row = op.TopK(unique, everything, axis=0, largest=0, sorted=1)
    # the inverse permutation by sorting the permutation, not by a scatter
    _, row_of_choice = op.TopK(choice_of_row, everything, axis=0, largest=0, sorted=1)
    # each segment's size: its sequence's valid choices of its memory, counted by comparison
    memories = op.Constant(value_ints=list(range(num_memories)))
    chosen = op.And(op.Equal(op.Unsqueeze(memory_idx, [3]), memories), op.Unsqueeze(valid, [3]))
    counts = op.ReduceSum(op.Cast(chosen, to=ir.DataType.INT64), _ints(1, 2), keepdims=0)  # [B, M]
    offsets = op.Concat(op.Constant(value_ints=[0]), op.CumSum(op.Reshape(counts, [-1]), 0), axis=0)
    token_of_row = op.Div(choice_of_row, k)
    memory_of_row = op.Gather(op.Reshape(in_range, [-1]), choice_of_row, axis=0)
    return token_of_row, memory_of_row, op.Reshape(row_of_choice, shape), offsets


# -- mom::segment_conv --------------------------------------------------------------------------
def segment_conv(x, weight, bias, offsets, initial_state):
    """(silu(causal depthwise conv) [N, D], final state [S, W-1, D]); see ops/segment_conv.py."""
    dt = _compute_type(x)
    n = _dim(x, 0)
    width = _dim(weight, 1)
    hist = op.Sub(width, 1)
    n_seg = op.Sub(_dim(offsets, 0), 1)
    seg, in_segment, pos = _segment_of_rows(offsets, n)

    # table rows: x (0..N-1), then history s*(W-1)+j, then one zero row
    history_rows = op.Reshape(_cast(initial_state, dt), op.Concat(_ints(-1), op.Shape(x, start=1), axis=0))
    zero_row = op.Expand(op.CastLike(0.0, history_rows), op.Concat(_ints(1), op.Shape(x, start=1), axis=0))
    table = op.Concat(_cast(x, dt), history_rows, zero_row, axis=0)
    zero_index = op.Add(n, op.Mul(n_seg, hist))

    back = op.Range(hist, -1, -1)  # how far back each tap reads: W-1 .. 0
    rel = op.Sub(_col(pos), _row(back))
    own = op.Sub(_col(op.Range(0, n, 1)), _row(back))
    history = op.Add(op.Add(n, op.Mul(_col(seg), hist)), op.Add(hist, rel))
    taps = op.Where(op.GreaterOrEqual(rel, 0), own, history)
    taps = op.Where(_col(in_segment), taps, zero_index)
    z = op.ReduceSum(op.Mul(op.Gather(table, taps), _row(op.Transpose(_cast(weight, dt)))), [1],
                     keepdims=0)
    z = op.Add(z, _cast(bias, dt))
    y = op.Mul(_silu(z), op.CastLike(_col(in_segment), z))

    lengths = op.Sub(op.Slice(offsets, [1], [_INT64_MAX]), op.Slice(offsets, [0], [-1]))
    rel_f = op.Add(op.Sub(_col(lengths), hist), _row(op.Range(0, hist, 1)))
    own_f = op.Add(_col(op.Slice(offsets, [0], [-1])), rel_f)
    history_f = op.Add(op.Add(n, op.Mul(_col(op.Range(0, n_seg, 1)), hist)), op.Add(hist, rel_f))
    final = op.Gather(table, op.Where(op.GreaterOrEqual(rel_f, 0), own_f, history_f))
    return op.CastLike(y, x), op.CastLike(final, x)


# -- the gated delta step: one scripted ONNX function, used by the scan body and the step op ------
# It is a model-local function in domain "mom" named MemoryStep, which the export inlines into plain
# ONNX ops: the math is written here once for the scan and the step.
MOM_DOMAIN = onnxscript.values.Opset("mom", 1)
SCAN_DOMAIN = onnxscript.values.Opset("mom.scan", 1)


@onnxscript.script(MOM_DOMAIN, default_opset=op)
def MemoryStep(  # noqa: N802 (the ONNX op's name)
    q: TState, k: TState, v: TState, g: TState, beta: TState, state: TState,
) -> tuple[TState, TState]:
    """q (pre-scaled), k [R, H, K]; v [R, H, V]; g, beta [R, H]; state [R, H, K, V], all in the
    state's type. Returns (o [R, H, V], new state): S <- e^g S; u = beta (v - S^T k); S <- S + k u^T;
    o = S^T q. (The scale is the callers': an ONNX float attribute holds only float32.)"""
    decayed = op.Mul(state, op.Unsqueeze(op.Exp(g), [2, 3]))
    k_row = op.Unsqueeze(k, [2])
    read = op.MatMul(k_row, decayed)
    u = op.Mul(op.Unsqueeze(beta, [2, 3]), op.Sub(op.Unsqueeze(v, [2]), read))
    new_state = op.Add(decayed, op.MatMul(op.Unsqueeze(k, [3]), u))
    o = op.Squeeze(op.MatMul(op.Unsqueeze(q, [2]), new_state), [2])
    return o, new_state


@onnxscript.script(SCAN_DOMAIN, default_opset=op)
def GatedDeltaScan(  # noqa: N802
    state0: TState, q: TState, k: TState, v: TState, g: TState, beta: TState,
) -> tuple[TState, TState]:
    """Time-major grids q, k [L, S, H, K], v [L, S, H, V], g, beta [L, S, H] (q pre-scaled):
    returns (final state [S, H, K, V], o [L, S, H, V]) by one MemoryStep per time step."""
    @onnxscript.graph()
    def token(state_in, q_t, k_t, v_t, g_t, beta_t):
        o_t, state_out = MemoryStep(q_t, k_t, v_t, g_t, beta_t, state_in)
        return state_out, o_t
    final, o = op.Scan(state0, q, k, v, g, beta, body=token, num_scan_inputs=5)
    return final, o


# -- opset 27's standard LinearAttention --------------------------------------------------------
LINEAR_ATTENTION_OPSET = 27
# The exporter builds an opset-18 graph, then converts it to the requested opset, and the
# converter fails on LinearAttention (it has no adapter for it). So the translations record the op
# in this domain, which the conversion passes through, and onnx_export.finish moves it to the
# default domain.
STAGING_DOMAIN = "mom.staging"


def _linear_attention(q, k, v, g, beta, state0, heads: int):
    """(o [B, T, H, V], final state [B, H, K, V]) by one LinearAttention over the T axis, for
    q, k [B, T, H, K] (q pre-scaled), v [B, T, H, V], g, beta [B, T, H], state0 [B, H, K, V]."""
    packed = _ints(0, 0, -1)  # heads into the last axis, as the op wants
    # scale explicit: the op's default 0.0 means K^-0.5
    o, final = _staged_linear_attention()(
        op.Reshape(q, packed), op.Reshape(k, packed), op.Reshape(v, packed), state0, g, beta,
        q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=1.0)
    return op.Reshape(o, op.Shape(v)), final


@functools.cache
def _staged_linear_attention() -> onnxscript.values.Op:
    """The standard LinearAttention op (same inputs, outputs and attributes) under STAGING_DOMAIN."""
    standard = onnx.defs.get_schema("LinearAttention", LINEAR_ATTENTION_OPSET)

    def formal(p):
        return onnx.defs.OpSchema.FormalParameter(p.name, p.type_str, p.description, param_option=p.option)

    schema = onnx.defs.OpSchema(
        standard.name, STAGING_DOMAIN, 1,
        inputs=[formal(p) for p in standard.inputs], outputs=[formal(p) for p in standard.outputs],
        type_constraints=[(c.type_param_str, c.allowed_type_strs, c.description)
                          for c in standard.type_constraints],
        attributes=list(standard.attributes.values()))
    return onnxscript.values.Op(onnxscript.values.Opset(STAGING_DOMAIN, 1), standard.name, schema)


def _heads(x) -> int:
    """H of x [N, H, ...]: a model constant, static in every exported program."""
    heads = x.shape[1] if x.shape is not None else None
    if not isinstance(heads, int):
        raise ValueError(f"LinearAttention needs a static number of heads (axis 1), got shape {x.shape}")
    return heads


# -- mom::chunk_gated_delta and mom::gated_delta_step --------------------------------------------
def gated_delta_translations(linear_attention: bool) -> tuple[Callable, Callable]:
    """The translations of the two recurrent ops, (chunk_gated_delta, gated_delta_step).

    With linear_attention they emit opset 27's standard LinearAttention(update_rule="gated_delta"),
    which computes exactly this rule; it takes no float64, so float64 exports (and all exports
    without linear_attention) use the scripted MemoryStep, under a Scan over time for sequences."""

    def standard_op(dtype: ir.DataType) -> bool:
        return linear_attention and dtype == ir.DataType.FLOAT

    def chunk_gated_delta(q, k, v, g, beta, offsets, initial_state=None, scale: float = 1.0):
        """(o [N, H, V], final state [S, H, K, V]) of the gated delta rule over packed segments."""
        dt = _compute_type(q)
        state_type = dt if initial_state is None else initial_state.dtype
        n = _dim(q, 0)
        starts = op.Slice(offsets, [0], [-1])
        lengths = op.Sub(op.Slice(offsets, [1], [_INT64_MAX]), starts)
        longest = op.Max(op.ReduceMax(lengths, keepdims=0), op.Constant(value_int=1))  # Scan needs >= 1 step
        time = op.Range(0, longest, 1)
        valid = op.Less(_col(time), _row(lengths))  # [L, S]
        grid_rows = op.Where(valid, op.Add(_row(starts), _col(time)), 0)
        keep = op.Unsqueeze(op.Cast(valid, to=dt), [2])  # padding cells: g = beta = 0, a no-op step
        q_grid, k_grid, v_grid = (op.Gather(_cast(t, dt), grid_rows) for t in (q, k, v))
        g_grid, beta_grid = (op.Mul(op.Gather(_cast(t, dt), grid_rows), keep) for t in (g, beta))

        if initial_state is None:
            state_shape = op.Concat(op.Shape(offsets), op.Shape(q, start=1), op.Shape(v, start=2), axis=0)
            state_shape = op.Sub(state_shape, _ints(1, 0, 0, 0))
            state0 = op.Expand(op.Cast(op.Constant(value_float=0.0), to=dt), state_shape)
        else:
            state0 = _cast(initial_state, dt)
        q_grid = op.Mul(q_grid, _scalar(scale, q_grid))
        if standard_op(dt):  # LinearAttention wants [segment, time] grids
            seg_major = [op.Transpose(t, perm=[1, 0, 2, 3]) for t in (q_grid, k_grid, v_grid)]
            seg_major += [op.Transpose(t, perm=[1, 0, 2]) for t in (g_grid, beta_grid)]
            o_grid, final = _linear_attention(*seg_major, state0, _heads(q))
            o_grid = op.Transpose(o_grid, perm=[1, 0, 2, 3])
        else:
            final, o_grid = GatedDeltaScan(state0, q_grid, k_grid, v_grid, g_grid, beta_grid)

        seg, in_segment, pos = _segment_of_rows(offsets, n)
        pos = op.Max(op.Min(pos, op.Sub(longest, 1)), op.Constant(value_int=0))
        o = op.GatherND(o_grid, op.Concat(_col(pos), _col(seg), axis=1))
        o = op.Mul(o, op.CastLike(op.Unsqueeze(in_segment, [1, 2]), o))
        return op.CastLike(o, v), op.Cast(final, to=state_type)

    def gated_delta_step(q, k, v, g, beta, state, scale: float = 1.0):
        """(o [R, H, V] in v's type, new state [R, H, K, V]) for one token per row; computes in the
        state's type."""
        qs, ks, vs, gs, betas = (op.CastLike(t, state) for t in (q, k, v, g, beta))
        qs = op.Mul(qs, _scalar(scale, qs))
        if standard_op(state.dtype):
            one_token = (op.Unsqueeze(t, [1]) for t in (qs, ks, vs, gs, betas))
            o, new_state = _linear_attention(*one_token, state, _heads(state))
            o = op.Squeeze(o, [1])
        else:
            o, new_state = MemoryStep(qs, ks, vs, gs, betas, state)
        return op.CastLike(o, v), new_state

    return chunk_gated_delta, gated_delta_step


# -- mom::memory_decode -------------------------------------------------------------------------
def memory_decode_translation(step: Callable) -> Callable:
    """mom::memory_decode (the functional form the export graphs use) as the composition its
    reference is (ops/memory_decode.py), on [B, k', ...] rows: each choice's projection set, conv
    window and state gathered by slot (a Gather on the flattened table), the gates, the one-row conv, per-head
    L2 normalisation, then `step` (the table's gated_delta_step translation, so the LinearAttention
    choice applies here too). The new tables take each chosen slot's row by a Where over all slots,
    not a scatter: a padding token's rows all point at slot 0, and ScatterND with repeated indices
    is undefined. Every shape but the batch is a constant, so the decode graph stays small (it runs
    once per token, and a provider pays for every node)."""

    def memory_decode(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states,  # noqa: N803
                      rec_states, scale: float = 1.0, single_set: bool = False):
        _, slots, h, dk, dv = rec_states.shape  # model constants, static in every exported program
        chosen, width = memory_idx.shape[1], conv_weight.shape[1]
        hk, hv = h * dk, h * dv
        dt = _compute_type(q)
        valid = op.GreaterOrEqual(memory_idx, op.Constant(value_int=0))  # [B, k']
        slot = op.Max(memory_idx, op.Constant(value_int=0))  # [B, k']
        n_sets = per_set.shape[1]
        proj = op.Gather(_flat(per_set), _flat_rows(op.Mul(slot, op.Constant(value_int=0)) if single_set
                                                    else slot, n_sets))  # [B, k', H*K + H*V + 2H]
        rows = _flat_rows(slot, slots)
        kv, b_pre, a_pre = _split_last(proj, [hk + hv, h, h])
        beta, g = _gates(b_pre, a_pre, A_log, dt_bias, dt)

        # the conv over one row: the window [history ; x], its last W-1 rows the new conv state
        x = op.Concat(op.Expand(op.Unsqueeze(q, [1]), _ints(1, chosen, 1)), kv, axis=2)  # [B, k', C]
        window = op.Concat(op.Gather(_flat(conv_states), rows), op.Unsqueeze(x, [2]), axis=2)
        conv_new = op.Slice(window, _ints(1), _ints(width), _ints(2))  # [B, k', W-1, C]
        taps = op.Transpose(_cast(conv_weight, dt))  # [W, C]
        z = op.Add(op.ReduceSum(op.Mul(_cast(window, dt), taps), _ints(2), keepdims=0),
                   _cast(_bias(conv_bias, conv_weight), dt))
        conv_out = op.CastLike(_silu(z), q)  # [B, k', C], rounded where the reference rounds
        qc, kc, vc = _split_last(conv_out, [hk, hk, hv])
        qc, kc = (_l2_normalize(op.Reshape(t, _ints(-1, h, dk)), dk, dt) for t in (qc, kc))

        rec_rows = op.Gather(_flat(rec_states), op.Reshape(rows, _ints(-1)))
        # the tracer infers no type or shape for these rows; `step` picks its ONNX op by them
        rec_rows.dtype, rec_rows.shape = rec_states.dtype, ir.Shape([None, h, dk, dv])
        o, rec_new = step(qc, kc, op.Reshape(vc, _ints(-1, h, dv)), op.Reshape(g, _ints(-1, h)),
                          op.Reshape(beta, _ints(-1, h)), rec_rows, scale=scale)
        o = op.Reshape(op.CastLike(o, rec_states), _ints(-1, chosen, h, dv))
        o = op.Where(op.Unsqueeze(valid, [2, 3]), o, op.CastLike(0.0, o))
        rec_new = op.Reshape(rec_new, _ints(-1, chosen, h, dk, dv))
        return o, _take_rows(conv_states, conv_new, memory_idx), _take_rows(rec_states, rec_new, memory_idx)

    return memory_decode


def plugin_memory_decode(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states,  # noqa: N803
                         rec_states, scale: float = 1.0, single_set: bool = False):
    """mom::memory_decode as the nodes of its two TensorRT plugins (plugin-mode exports, plugin.py):
    the conv plugin's new conv table and scratch, then the step plugin's new recurrent table and o."""
    plugin.register_schemas()
    mom = onnxscript.values.Opset(plugin.DOMAIN, plugin.VERSION)
    conv_new, qkv, beta_g = getattr(mom, CONV.name)(
        q, per_set, memory_idx, A_log, dt_bias, conv_weight, _bias(conv_bias, conv_weight), conv_states,
        **plugin.node_attributes(CONV, single_set=single_set))
    rec_new, o = getattr(mom, STEP.name)(memory_idx, qkv, beta_g, rec_states,
                                          **plugin.node_attributes(STEP, scale=scale))
    return o, conv_new, rec_new


def _bias(conv_bias, conv_weight):
    """The conv bias, zeros [C] where the model has none."""
    if conv_bias is not None:
        return conv_bias
    return op.CastLike(op.ConstantOfShape(op.Shape(conv_weight, start=0, end=1)), conv_weight)


def _take_rows(table, rows, memory_idx):
    """table [B, S, ...] with slot (b, s) replaced by rows[b, i] where memory_idx[b, i] = s."""
    slots = table.shape[1]
    chosen_at = op.Equal(op.Unsqueeze(memory_idx, [2]), op.Constant(value_ints=list(range(slots))))
    picked = op.Cast(chosen_at, to=ir.DataType.FLOAT)  # [B, k', S]; float: ArgMax has no int64 CUDA kernel
    taken = op.Greater(op.ReduceMax(picked, _ints(1), keepdims=0), op.Constant(value_float=0.0))  # [B, S]
    which = op.ArgMax(picked, axis=1, keepdims=0)  # [B, S]: the choice that wrote the slot
    new = op.Gather(op.CastLike(_flat(rows, table.shape[2:]), table), _flat_rows(which, memory_idx.shape[1]))
    tail = [1] * (len(table.shape) - 2)
    return op.Where(op.Reshape(taken, _ints(0, slots, *tail)), new, table)


def _flat(table, tail=None):
    """table [B, n, ...] as [B * n, ...]; `tail` gives the trailing dims where the tracer lacks them."""
    tail = list(table.shape[2:] if tail is None else tail)
    return op.Reshape(table, _ints(-1, *tail))


def _flat_rows(index, per_batch: int):
    """b * per_batch + index[b, i]: rows of a table flattened by `_flat`, for index [B, n]. (Gather,
    not GatherND over the batch: the CUDA GatherND sends host metadata to the device at every run,
    which a captured CUDA graph cannot replay.)"""
    batch = op.Range(op.Constant(value_int=0), _dim(index, 0), op.Constant(value_int=1))
    return op.Add(op.Mul(op.Unsqueeze(batch, [1]), op.Constant(value_int=per_batch)), index)


def _gates(b_pre, a_pre, A_log, dt_bias, dt: ir.DataType):  # noqa: N803
    """(beta, g) as ops/memory_decode.py's `gates`: sigmoid(b_pre), and -exp(A_log) *
    softplus(a_pre + dt_bias) in `dt`, softplus(x) = x above SOFTPLUS_THRESHOLD."""
    a = op.Add(_cast(a_pre, dt), _cast(dt_bias, dt))
    capped = op.Min(a, op.CastLike(SOFTPLUS_THRESHOLD, a))
    softplus = op.Where(op.Greater(a, op.CastLike(SOFTPLUS_THRESHOLD, a)), a,
                        op.Log(op.Add(op.Exp(capped), op.CastLike(1.0, a))))
    return op.Sigmoid(b_pre), op.Mul(op.Neg(op.Exp(_cast(A_log, dt))), softplus)


def _silu(z):
    """z * sigmoid(z), written as z / (1 + e^-z): onnxruntime fuses z * Sigmoid(z) into QuickGelu,
    which its CUDA provider, with memory reuse on, hands on with the wrong shape."""
    return op.Div(z, op.Add(op.CastLike(1.0, z), op.Exp(op.Neg(z))))


def _l2_normalize(x, n: int, dt: ir.DataType):
    """x / sqrt(sum x^2 + eps) over the last axis of n entries, computed in `dt` (x's compute type,
    given by the caller: the tracer infers no type for x, a reshaped slice). Written as an RMS norm,
    x / sqrt(mean x^2 + eps / n) * n^-1/2, the pattern onnxruntime fuses into one node; in float64
    as it stands, since the fused node computes in float32."""
    xf = op.Cast(x, to=dt)
    if dt == ir.DataType.DOUBLE:
        norm = op.Sqrt(op.Add(op.ReduceSum(op.Mul(xf, xf), _ints(-1), keepdims=1), _scalar(L2_EPS, xf)))
        return op.CastLike(op.Div(xf, norm), x)
    mean_square = op.ReduceMean(op.Pow(xf, op.CastLike(2.0, xf)), _ints(-1), keepdims=1)
    rms = op.Sqrt(op.Add(mean_square, _scalar(L2_EPS / n, xf)))
    return op.CastLike(op.Mul(op.Div(xf, rms), op.CastLike(op.Constant(value_floats=[n ** -0.5] * n), xf)), x)


# -- mom::combine -------------------------------------------------------------------------------
def combine(o_rows, weights, row_of_choice):
    """y [B, T, H, V] = sum_i weights[b, t, i] * o_rows[row_of_choice[b, t, i]], in weights' type."""
    picked = op.CastLike(op.Gather(o_rows, row_of_choice), weights)
    return op.ReduceSum(op.Mul(picked, op.Unsqueeze(weights, [3, 4])), [2], keepdims=0)


def translation_table(opset: int, use_plugin: bool = False) -> dict:
    """The exporter's custom_translation_table entries for every `mom` op at ONNX `opset`. From
    LINEAR_ATTENTION_OPSET on, the gated delta rule is the standard LinearAttention op; with
    use_plugin each mom::memory_decode is the two nodes of its TensorRT plugins."""
    mom = torch.ops.mom
    chunk_gated_delta, gated_delta_step = gated_delta_translations(
        linear_attention=opset >= LINEAR_ATTENTION_OPSET)
    decode = plugin_memory_decode if use_plugin else memory_decode_translation(gated_delta_step)
    return {
        mom.dispatch.default: dispatch,
        mom.segment_conv.default: segment_conv,
        mom.chunk_gated_delta.default: chunk_gated_delta,
        mom.gated_delta_step.default: gated_delta_step,
        mom.memory_decode.default: decode,
        mom.combine.default: combine,
    }
