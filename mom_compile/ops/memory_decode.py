"""`mom::memory_decode`: one decode token through one memory, reading its state from the cache
(docs/math.md#decoding-state).

Each row r is a (token, memory) pair whose states are row slot[r] of the cache's state tables.
With x = conv_in[r] the memory's pre-conv q|k|v projection of the token:
    c        = silu(conv of [conv_states[slot] ; x])      the `segment_conv.py` math, one row
    q, k     = per-head L2-normalised q and k parts of c; v its v part
    o, S'    = one gated delta step of rec_states[slot]   the `gated_delta_step.py` math
Returns o [R, H, V] (float32, float64 for float64 states) and the rows' advanced states, conv_new
[R, W-1, C] and rec_new [R, H, K, V], which the caller writes back into its cache.

The op exists for speed: decoding is bound by kernel launches, and the composition of the ops
above is about ten kernels per layer where the Triton kernel is one. It is inference-only, with
no autograd: `MomLayer` steps through the scan ops when gradients are needed.
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, STATE_DTYPES, check_same_device, check_tensor
from .gated_delta_step import step_reference
from .precision import upcast
from .segment_conv import conv_reference

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim, computed in float32 (or float64)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


def decode_reference(conv_in, beta, g, slot, conv_weight, conv_bias, conv_states, rec_states, scale: float):
    """The composition of the conv and step references, rounding where the separate ops round
    (conv output, normalised q and k, and o in the input dtype)."""
    rows = conv_in.shape[0]
    _, h, dk, dv = rec_states.shape
    if conv_bias is None:
        conv_bias = conv_weight.new_zeros(conv_weight.shape[0])
    one_each = torch.arange(rows + 1, device=conv_in.device)
    _, conv_out, conv_new = conv_reference(conv_in, conv_weight, conv_bias, one_each, conv_states[slot])
    q, k, v = conv_out.to(conv_in.dtype).split([h * dk, h * dk, h * dv], dim=-1)
    q, k = (l2_normalize(t.reshape(rows, h, dk)) for t in (q, k))
    o, rec_new = step_reference(q, k, v.reshape(rows, h, dv), g, beta, rec_states[slot], scale)
    return o.to(conv_in.dtype).to(rec_states.dtype), conv_new.to(conv_states.dtype), rec_new


@torch.library.custom_op("mom::memory_decode", mutates_args=())
def memory_decode_op(
    conv_in: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, slot: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None, conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return decode_reference(conv_in, beta, g, slot, conv_weight, conv_bias, conv_states, rec_states, scale)


@memory_decode_op.register_fake
def _(conv_in, beta, g, slot, conv_weight, conv_bias, conv_states, rec_states, scale):
    rows = conv_in.shape[0]
    _, h, dk, dv = rec_states.shape
    return (rec_states.new_empty(rows, h, dv), conv_states.new_empty(rows, *conv_states.shape[1:]),
            rec_states.new_empty(rows, h, dk, dv))


def memory_decode(
    conv_in: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, slot: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None, conv_states: torch.Tensor, rec_states: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode token through one memory per row (see the module docstring).

    conv_in: [R, C] pre-conv q|k|v (C = 2HK + HV); beta: [R, H]; g: [R, H] float32 log-decay;
    slot: [R] int64 rows of the state tables; conv_weight: [C, W]; conv_bias: [C] or None;
    conv_states: [P, W-1, C]; rec_states: [P, H, K, V] float32 (or float64).
    Returns (o [R, H, V] in the states' dtype, conv_new [R, W-1, C], rec_new [R, H, K, V]).
    """
    check_tensor("rec_states", rec_states, shape=(None, None, None, None), dtypes=STATE_DTYPES)
    p, h, dk, dv = rec_states.shape
    check_tensor("conv_in", conv_in, shape=(None, 2 * h * dk + h * dv), dtypes=FLOAT_DTYPES)
    rows, c = conv_in.shape
    check_tensor("beta", beta, shape=(rows, h), dtypes=(conv_in.dtype,))
    check_tensor("g", g, shape=(rows, h), dtypes=STATE_DTYPES)
    check_tensor("slot", slot, shape=(rows,), dtypes=INDEX_DTYPES)
    check_tensor("conv_weight", conv_weight, shape=(c, None), dtypes=(conv_in.dtype,))
    if conv_weight.shape[1] < 2:
        raise ValueError(f"conv_weight: expected a width of at least 2, got {conv_weight.shape[1]}")
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, shape=(c,), dtypes=(conv_in.dtype,))
    check_tensor("conv_states", conv_states, shape=(p, conv_weight.shape[1] - 1, c), dtypes=(conv_in.dtype,))
    check_same_device(conv_in=conv_in, beta=beta, g=g, slot=slot, conv_weight=conv_weight,
                      conv_bias=conv_bias, conv_states=conv_states, rec_states=rec_states)
    return torch.ops.mom.memory_decode(conv_in, beta, g, slot, conv_weight, conv_bias, conv_states,
                                       rec_states, float(scale))
