"""`mom::dispatch` and `mom::combine`: moving tokens into per-memory segments and back.

Every token makes exactly k choices, so the routed work is always B*T*k rows: only the order of the
rows and the segment offsets depend on the data, and they stay on the device.

dispatch: choice (b, t, i) of memory m goes to segment b*M + m; segments are laid out in that
order and, inside a segment, rows keep time order (the sort is stable: this is the semantics).
Choices of padding tokens (mask = 0) are placed after the last segment: in no segment at all.

combine: y[b, t] = sum_i weights[b, t, i] * o_rows[row_of_choice[b, t, i]], in float32.
"""
from __future__ import annotations

import torch

from ._checks import INDEX_DTYPES, STATE_DTYPES, check_same_device, check_tensor


def dispatch_reference(memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int):
    b, t, k = memory_idx.shape
    batch = torch.arange(b, device=memory_idx.device)[:, None, None]
    n_seg = b * num_memories
    key = torch.where(mask[:, :, None], batch * num_memories + memory_idx, n_seg).flatten()
    choice_of_row = torch.sort(key, stable=True).indices
    row_of_choice = torch.empty_like(choice_of_row)
    row_of_choice[choice_of_row] = torch.arange(key.numel(), device=key.device)
    counts = torch.zeros(n_seg + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.cat([counts.new_zeros(1), counts[:n_seg].cumsum(0)])
    return choice_of_row, row_of_choice.view(b, t, k), offsets


@torch.library.custom_op("mom::dispatch", mutates_args=())
def _dispatch(
    memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch_reference(memory_idx, mask, num_memories)


@_dispatch.register_fake
def _(memory_idx, mask, num_memories):
    b, t, k = memory_idx.shape
    return (memory_idx.new_empty(b * t * k), memory_idx.new_empty(b, t, k),
            memory_idx.new_empty(b * num_memories + 1))


def dispatch(
    memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the routed choices by (batch, memory).

    memory_idx: [B, T, k] int64, the memories each token chose (distinct per token);
    mask: [B, T] bool, False for padding; num_memories: M.
    Returns (choice_of_row [B*T*k]: the flat (b, t, i) index each packed row holds,
    row_of_choice [B, T, k]: its inverse, offsets [B*M + 1]: segment b*M + m starts at
    offsets[b*M + m]).
    """
    check_tensor("memory_idx", memory_idx, shape=(None, None, None), dtypes=INDEX_DTYPES)
    b, t, _ = memory_idx.shape
    check_tensor("mask", mask, shape=(b, t), dtypes=(torch.bool,))
    if num_memories < 1:
        raise ValueError(f"num_memories: expected at least 1, got {num_memories}")
    check_same_device(memory_idx=memory_idx, mask=mask)
    return torch.ops.mom.dispatch(memory_idx, mask, int(num_memories))


@torch.library.custom_op("mom::combine", mutates_args=())
def _combine(o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor) -> torch.Tensor:
    picked = o_rows[row_of_choice].to(weights.dtype)
    return (picked * weights[..., None, None]).sum(2)


@_combine.register_fake
def _(o_rows, weights, row_of_choice):
    b, t, _ = row_of_choice.shape
    return o_rows.new_empty(b, t, *o_rows.shape[1:], dtype=weights.dtype)


@torch.library.custom_op("mom::combine_backward", mutates_args=())
def _combine_backward_op(
    d_y: torch.Tensor, o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows in o_rows' dtype, d_weights in d_y's dtype) of combine."""
    spread = weights[..., None, None] * d_y[:, :, None]
    d_rows = torch.zeros(o_rows.shape, dtype=spread.dtype, device=o_rows.device)
    d_rows = d_rows.index_copy(0, row_of_choice.flatten(), spread.flatten(0, 2)).to(o_rows.dtype)
    d_weights = (o_rows[row_of_choice].to(d_y.dtype) * d_y[:, :, None]).sum((-1, -2))
    return d_rows, d_weights


@_combine_backward_op.register_fake
def _(d_y, o_rows, weights, row_of_choice):
    return o_rows.new_empty(o_rows.shape), d_y.new_empty(row_of_choice.shape)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, d_y):
    o_rows, weights, row_of_choice = ctx.saved_tensors
    d_rows, d_weights = torch.ops.mom.combine_backward(d_y, o_rows, weights, row_of_choice)
    return d_rows, d_weights, None


_combine.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine(o_rows: torch.Tensor, weights: torch.Tensor, row_of_choice: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k rows.

    o_rows: [N, H, V]; weights: [B, T, k] float32; row_of_choice: [B, T, k] int64, a permutation
    of 0..N-1 (N = B*T*k) as `dispatch` returns. Returns y [B, T, H, V] float32.
    """
    check_tensor("o_rows", o_rows, shape=(None, None, None))
    check_tensor("row_of_choice", row_of_choice, shape=(None, None, None), dtypes=INDEX_DTYPES)
    b, t, k = row_of_choice.shape
    if o_rows.shape[0] != b * t * k:
        raise ValueError(f"o_rows: expected {b * t * k} rows (B*T*k), got {o_rows.shape[0]}")
    check_tensor("weights", weights, shape=(b, t, k), dtypes=STATE_DTYPES)
    check_same_device(o_rows=o_rows, weights=weights, row_of_choice=row_of_choice)
    return torch.ops.mom.combine(o_rows, weights, row_of_choice)
