"""`mom::memory_decode_` and `mom::memory_decode`: one decode token of every sequence through the
memories it is routed to, reading and writing the cache's states by slot (docs/math.md#decoding-state).

For sequence b and its i-th choice m = memory_idx[b, i] (-1 marks a padding token: it reads out 0
and changes no state), with projection set s = 0 if single_set else m:
    x        = q[b] | the k and v parts of per_set[b, s]      the pre-conv q|k|v projections, C channels
    beta, g  = gates(beta and alpha parts of per_set[b, s])  see `gates`
    c        = silu(conv of [conv_states[b, m] ; x])          the `segment_conv.py` math, one row
    q, k     = per-head L2-normalised q and k parts of c; v its v part
    o, S'    = one gated delta step of rec_states[b, m]       the `gated_delta_step.py` math
and conv_states[b, m], rec_states[b, m] advance by that token. A token's choices are distinct
memories, so no two rows touch one slot.

`memory_decode_` writes the advanced states into the tables in place (the cache of `generate`, whose
buffers a CUDA graph keeps at fixed addresses); `memory_decode` returns new tables instead, for the
export graphs, which cannot express mutation. Both share this reference and the Triton kernels.
The ops exist for speed: decoding is bound by kernel launches and by reading and writing the states,
and the composition of the other ops is about ten kernels a layer and two extra passes over them.
They are inference-only, with no autograd: `MomLayer` steps through the scan ops when gradients are
needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    STATE_DTYPES,
    check_bool,
    check_distinct,
    check_float,
    check_index_values,
    check_same_device,
    check_tensor,
    check_writable,
)
from .direct_call import call
from .gated_delta_step import step_reference
from .gather_rows import gather_rows_reference
from .l2_normalize import l2_normalize
from .precision import compute_dtype
from .segment_conv import conv_reference

SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it, as torch's softplus (ONNX's has no threshold)


def gates(b_pre: torch.Tensor, a_pre: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):  # noqa: N803
    """Write strength and log-decay from the projections: beta = sigmoid(b_pre) in b_pre's dtype,
    g = -exp(A_log) * softplus(a_pre + dt_bias) in float32 (float64 for float64)."""
    dt = compute_dtype(a_pre.dtype)
    g = -A_log.to(dt).exp() * F.softplus(a_pre.to(dt) + dt_bias.to(dt), threshold=SOFTPLUS_THRESHOLD)
    return b_pre.sigmoid(), g


def decode_reference_(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias,  # noqa: N803
                      conv_states, rec_states, scale: float, single_set: bool) -> torch.Tensor:
    """The reference kernel of `memory_decode_`: the conv and step references per row, rounding
    where the separate ops round (conv output, normalised q and k, o in the input dtype)."""
    h, dk, dv = rec_states.shape[2:]
    b, chosen = memory_idx.shape
    token = torch.arange(b, device=q.device).repeat_interleave(chosen)
    memory = memory_idx.flatten()
    valid = memory >= 0
    slot = memory.clamp(min=0)
    rows = torch.arange(b * chosen, device=q.device).view(b, chosen)  # token-major: the identity
    sets = torch.zeros_like(slot) if single_set else slot
    x, gate_in = gather_rows_reference(q, per_set, token, sets, rows, per_set.shape[-1] - 2 * h)
    beta, g = gates(*gate_in.split(h, dim=-1), A_log, dt_bias)
    if conv_bias is None:
        conv_bias = conv_weight.new_zeros(conv_weight.shape[0])
    one_each = torch.arange(x.shape[0] + 1, device=x.device)
    old_conv, old_rec = conv_states[token, slot], rec_states[token, slot]
    _, conv_out, conv_new = conv_reference(x, conv_weight, conv_bias, one_each, old_conv)
    qc, kc, vc = conv_out.to(x.dtype).split([h * dk, h * dk, h * dv], dim=-1)
    qc, kc = (l2_normalize(t.reshape(-1, h, dk)) for t in (qc, kc))
    o, rec_new = step_reference(qc, kc, vc.reshape(-1, h, dv), g, beta, old_rec, scale)
    # a reference kernel may read values: only rows of real tokens are written
    conv_states[token[valid], slot[valid]] = conv_new[valid].to(conv_states.dtype)
    rec_states[token[valid], slot[valid]] = rec_new[valid]
    o = torch.where(valid.view(-1, 1, 1), o.to(x.dtype).to(rec_states.dtype), 0.0)
    return o.view(*memory_idx.shape, h, dv)


@torch.library.custom_op("mom::memory_decode_", mutates_args=("conv_states", "rec_states"))
def memory_decode_inplace_op(
    q: torch.Tensor, per_set: torch.Tensor, memory_idx: torch.Tensor, A_log: torch.Tensor,  # noqa: N803
    dt_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float, single_set: bool,
) -> torch.Tensor:
    return decode_reference_(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states,
                             rec_states, scale, single_set)


@memory_decode_inplace_op.register_fake
def _(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states, rec_states, scale,  # noqa: N803
      single_set):
    return rec_states.new_empty(*memory_idx.shape, *rec_states.shape[2:3], rec_states.shape[4])


def decode_reference(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias,  # noqa: N803
                     conv_states, rec_states, scale: float, single_set: bool):
    """`memory_decode` on every device: the in-place op (the Triton kernels on CUDA) on contiguous
    copies."""
    conv_states, rec_states = (t.clone(memory_format=torch.contiguous_format)
                               for t in (conv_states, rec_states))
    o = torch.ops.mom.memory_decode_(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias,
                                     conv_states, rec_states, scale, single_set)
    return o, conv_states, rec_states


@torch.library.custom_op("mom::memory_decode", mutates_args=())
def memory_decode_op(
    q: torch.Tensor, per_set: torch.Tensor, memory_idx: torch.Tensor, A_log: torch.Tensor,  # noqa: N803
    dt_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float, single_set: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return decode_reference(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states,
                            rec_states, scale, single_set)


@memory_decode_op.register_fake
def _(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states, rec_states, scale,  # noqa: N803
      single_set):
    o = rec_states.new_empty(*memory_idx.shape, *rec_states.shape[2:3], rec_states.shape[4])
    return o, *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (conv_states, rec_states))


def check_tables_contiguous(conv_states: torch.Tensor, rec_states: torch.Tensor) -> None:
    """The in-place op's state tables are written where they lie: the kernels need them dense."""
    if not (conv_states.is_contiguous() and rec_states.is_contiguous()):
        raise ValueError("conv_states, rec_states: expected contiguous tables (they are written in place)")


def _checked(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states,  # noqa: N803
             rec_states, scale, single_set) -> tuple:
    check_tensor("rec_states", rec_states, shape=(None, None, None, None, None), dtypes=STATE_DTYPES)
    b, slots, h, dk, dv = rec_states.shape
    if min(h, dk, dv) < 1:
        raise ValueError(f"rec_states: expected [batch, slots, H, K, V] with H, K and V at least 1, got "
                         f"{list(rec_states.shape)}")
    c = 2 * h * dk + h * dv
    check_tensor("q", q, shape=(b, h * dk), dtypes=FLOAT_DTYPES)
    check_tensor("per_set", per_set, shape=(b, None, h * dk + h * dv + 2 * h), dtypes=(q.dtype,))
    sets = 1 if single_set else slots
    if per_set.shape[1] < sets:
        raise ValueError(f"per_set: expected at least {sets} projection sets, got {per_set.shape[1]}")
    check_tensor("memory_idx", memory_idx, shape=(b, None), dtypes=INDEX_DTYPES)
    if memory_idx.shape[1] > slots:
        raise ValueError(f"memory_idx: expected at most {slots} distinct slots per token, got "
                         f"{memory_idx.shape[1]}")
    check_index_values("memory_idx", memory_idx, -1, slots)  # -1: a padding token
    check_distinct("memory_idx", memory_idx, slots, "slots")
    check_tensor("A_log", A_log, shape=(h,), dtypes=FLOAT_DTYPES)
    check_tensor("dt_bias", dt_bias, shape=(h,), dtypes=FLOAT_DTYPES)
    check_tensor("conv_weight", conv_weight, shape=(c, None), dtypes=(q.dtype,))
    if conv_weight.shape[1] < 2:
        raise ValueError(f"conv_weight: expected a width of at least 2, got {conv_weight.shape[1]}")
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, shape=(c,), dtypes=(q.dtype,))
    check_tensor("conv_states", conv_states, shape=(b, slots, conv_weight.shape[1] - 1, c), dtypes=(q.dtype,))
    check_same_device(q=q, per_set=per_set, memory_idx=memory_idx, A_log=A_log, dt_bias=dt_bias,
                      conv_weight=conv_weight, conv_bias=conv_bias, conv_states=conv_states,
                      rec_states=rec_states)
    return (q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states, rec_states,
            check_float("scale", scale), check_bool("single_set", single_set))


def memory_decode_(
    q: torch.Tensor, per_set: torch.Tensor, memory_idx: torch.Tensor, A_log: torch.Tensor,  # noqa: N803
    dt_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float, single_set: bool = False,
) -> torch.Tensor:
    """One decode token per sequence through its chosen memories (see the module docstring); the
    states advance in place.

    q: [B, H*K] pre-conv query projection; per_set: [B, n_sets, H*K + H*V + 2H], each memory set's
    pre-conv k | v projections, then the beta and alpha logits; memory_idx: [B, k'] int64, the slots
    each token writes (distinct per token; -1 = padding); A_log, dt_bias: [H];
    conv_weight: [C, W] and conv_bias: [C] or None (C = 2*H*K + H*V); conv_states: [B, S, W-1, C]
    in q's dtype; rec_states: [B, S, H, K, V] float32 (or float64); single_set: every memory uses
    projection set 0. Returns o [B, k', H, V] in the states' dtype.
    """
    check_tables_contiguous(conv_states, rec_states)
    check_writable("conv_states", conv_states)  # the layer's eager step checks its cache entry itself
    check_writable("rec_states", rec_states)
    return call(memory_decode_inplace_op, *_checked(q, per_set, memory_idx, A_log, dt_bias, conv_weight,
                                                  conv_bias, conv_states, rec_states, scale, single_set))


def memory_decode(
    q: torch.Tensor, per_set: torch.Tensor, memory_idx: torch.Tensor, A_log: torch.Tensor,  # noqa: N803
    dt_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
    conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float, single_set: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`memory_decode_` without mutation: the same arguments; returns (o, the advanced conv_states,
    the advanced rec_states) and leaves the given tables alone."""
    return call(memory_decode_op, *_checked(q, per_set, memory_idx, A_log, dt_bias, conv_weight,
                                                 conv_bias, conv_states, rec_states, scale, single_set))
