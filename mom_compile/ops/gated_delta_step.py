"""`mom::gated_delta_step`: one token of the gated delta rule (docs/math.md#the-gated-delta-rule),
functional.

For every row r (one (sequence, memory) pair) and head h, with state S of shape [K, V]:
    S <- exp(g) * S
    u  = beta * (v - S^T k)
    S <- S + k u^T
    o  = S^T (scale * q)
The per-token forward and backward here are the single place this math is written; the chunked
scan's backward replays them token by token.
"""
from __future__ import annotations

import torch

from ._checks import STATE_DTYPES, check_float, check_rows, check_same_device, check_tensor
from .direct_call import call


def step_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for a batch of rows: q, k [R, H, K]; v [R, H, V]; g, beta [R, H]; state
    [R, H, K, V]. Computes in the state's dtype; returns (o in v's dtype, new state)."""
    dt = state.dtype
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    decayed = state * g.exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("rhk,rhkv->rhv", k, decayed))
    new_state = decayed + k[..., :, None] * u[..., None, :]
    o = scale * torch.einsum("rhk,rhkv->rhv", q, new_state)
    return o, new_state


def step_backward_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float, d_o: torch.Tensor, d_new_state: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `step_reference` given d_o [R, H, V] and d_new_state [R, H, K, V]; all in the
    state's dtype. Returns (dq, dk, dv, dg, dbeta, d_state)."""
    dt = state.dtype
    q, k, v, g, beta, d_o, d_new_state = (
        t.to(dt) for t in (q, k, v, g, beta, d_o, d_new_state))
    decay = g.exp()[..., None, None]
    decayed = state * decay
    residual = v - torch.einsum("rhk,rhkv->rhv", k, decayed)
    u = beta[..., None] * residual
    new_state = decayed + k[..., :, None] * u[..., None, :]

    d_s = d_new_state + scale * q[..., :, None] * d_o[..., None, :]
    dq = scale * torch.einsum("rhkv,rhv->rhk", new_state, d_o)
    du = torch.einsum("rhkv,rhk->rhv", d_s, k)
    dbeta = (du * residual).sum(-1)
    d_residual = beta[..., None] * du
    dv = d_residual
    dk = torch.einsum("rhkv,rhv->rhk", d_s, u) - torch.einsum("rhkv,rhv->rhk", decayed, d_residual)
    d_decayed = d_s - k[..., :, None] * d_residual[..., None, :]
    dg = (d_decayed * decayed).sum((-1, -2))
    return dq, dk, dv, dg, dbeta, d_decayed * decay


def gated_delta_step_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel: `step_reference` with the op's output dtypes."""
    o, new_state = step_reference(q, k, v, g, beta, state, scale)
    return o.to(v.dtype), new_state


gated_delta_step_op = torch.library.custom_op("mom::gated_delta_step", mutates_args=())(
    gated_delta_step_reference)


@gated_delta_step_op.register_fake
def _(q, k, v, g, beta, state, scale):
    return v.new_empty(v.shape), state.new_empty(state.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, state, scale = inputs
    ctx.save_for_backward(q, k, v, g, beta, state)
    ctx.scale = scale


def _backward(ctx, d_o, d_new_state):
    q, k, v, g, beta, state = ctx.saved_tensors
    if d_new_state is None:
        d_new_state = torch.zeros_like(state)
    if d_o is None:
        d_o = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, d_state = step_backward_reference(
        q, k, v, g, beta, state, ctx.scale, d_o, d_new_state)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            d_state, None)


gated_delta_step_op.register_autograd(_backward, setup_context=_setup_context)


def gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance R independent states by one token each.

    q, k: [R, H, K]; v: [R, H, V]; g: [R, H] float32 log-decay (<= 0); beta: [R, H];
    state: [R, H, K, V] float32 (or float64). Returns (o [R, H, V] in v's dtype, new state).
    """
    r, h, dk, dv = check_rows(q, k, v, g, beta)
    check_tensor("state", state, shape=(r, h, dk, dv), dtypes=STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, state=state)
    return call(gated_delta_step_op, q, k, v, g, beta, state, check_float("scale", scale))
