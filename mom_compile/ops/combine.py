"""`mom::combine`: each token's output, the router-weighted sum of its k rows
(docs/math.md#routing-and-segments):
    y[b, t] = sum_i weights[b, t, i] * o_rows[row_of_choice[b, t, i]],
in the weights' dtype (float32, or float64). row_of_choice is `dispatch`'s permutation.
"""
from __future__ import annotations

import torch

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    STATE_DTYPES,
    check_permutation,
    check_same_device,
    check_tensor,
)
from .direct_call import call


def combine_reference(
    o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor,
) -> torch.Tensor:
    """The op's reference kernel: gather each token's k rows, weight and sum them."""
    picked = o_rows[row_of_choice].to(weights.dtype)
    return (picked * weights[..., None, None]).sum(2)


combine_op = torch.library.custom_op("mom::combine", mutates_args=())(combine_reference)


@combine_op.register_fake
def _(o_rows, weights, row_of_choice):
    b, t, _ = row_of_choice.shape
    return o_rows.new_empty(b, t, *o_rows.shape[1:], dtype=weights.dtype)


def combine_backward_reference(
    d_y: torch.Tensor, o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op's reference kernel: (d_rows in o_rows' dtype, d_weights in d_y's dtype)."""
    spread = weights[..., None, None] * d_y[:, :, None]
    d_rows = torch.zeros(o_rows.shape, dtype=spread.dtype, device=o_rows.device)
    d_rows = d_rows.index_copy(0, row_of_choice.flatten(), spread.flatten(0, 2)).to(o_rows.dtype)
    d_weights = (o_rows[row_of_choice].to(d_y.dtype) * d_y[:, :, None]).sum((-1, -2))
    return d_rows, d_weights


combine_backward_op = torch.library.custom_op("mom::combine_backward", mutates_args=())(
    combine_backward_reference)


@combine_backward_op.register_fake
def _(d_y, o_rows, weights, row_of_choice):
    return o_rows.new_empty(o_rows.shape), d_y.new_empty(row_of_choice.shape)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, d_y):
    o_rows, weights, row_of_choice = ctx.saved_tensors
    d_rows, d_weights = torch.ops.mom.combine_backward(d_y, o_rows, weights, row_of_choice)
    return d_rows, d_weights, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine(o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k rows.

    o_rows: [N, H, V]; weights: [B, T, k] float32 (or float64); row_of_choice: [B, T, k] int64, a
    permutation of 0..N-1 (N = B*T*k) as `dispatch` returns. Returns y [B, T, H, V] in the
    weights' dtype.
    """
    check_tensor("o_rows", o_rows, shape=(None, None, None), dtypes=FLOAT_DTYPES)
    check_tensor("row_of_choice", row_of_choice, shape=(None, None, None), dtypes=INDEX_DTYPES)
    b, t, k = row_of_choice.shape
    if o_rows.shape[0] != b * t * k:
        raise ValueError(f"o_rows: expected {b * t * k} rows (B*T*k), got {o_rows.shape[0]}")
    check_tensor("weights", weights, shape=(b, t, k), dtypes=STATE_DTYPES)
    check_same_device(o_rows=o_rows, weights=weights, row_of_choice=row_of_choice)
    check_permutation("row_of_choice", row_of_choice)
    return call(combine_op, o_rows, weights, row_of_choice)
