"""`mom::dispatch`: grouping the routed choices into per-(sequence, memory) segments
(docs/math.md#routing-and-segments); `combine.py` brings the rows back.

Every token makes exactly k choices, so the routed work is always B*T*k rows: only the order of the
rows and the segment offsets depend on the data, and they stay on the device.
Choice (b, t, i) of memory m goes to segment b*M + m; segments are laid out in that order and,
inside a segment, rows keep time order (a stable grouping: this is the semantics). Choices of
padding tokens (mask = 0) are placed after the last segment: in no segment at all.
"""
from __future__ import annotations

import torch

from ._checks import INDEX_DTYPES, check_distinct, check_int, check_same_device, check_tensor
from .direct_call import call


def dispatch_reference(
    memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's reference kernel: a counting sort in stock torch, no host sync (the CUDA kernel,
    `dispatch_triton.py`, sorts the same way in three launches).

    One running count goes over the one-hot choices laid out as [B, M, T*k] (segment by segment,
    time order inside each) and then over the padding choices: the count at a choice, minus one, is
    its row. A choice naming no memory in [0, M) counts as padding, so the rows stay a permutation.
    """
    b, t, k = memory_idx.shape
    n = t * k
    memory = memory_idx.reshape(b, 1, n)
    valid = mask[:, None, :, None].expand(b, 1, t, k).reshape(b, 1, n)
    valid = valid & (memory >= 0) & (memory < num_memories)
    hot = (memory == torch.arange(num_memories, device=memory.device)[:, None]) & valid  # [B, M, T*k]
    position = torch.cat([hot.flatten(), ~valid.flatten()]).cumsum(0) - 1
    segment_rows = position[:hot.numel()].view(b, num_memories, n)
    padding_rows = position[hot.numel():].view(b, 1, n)
    in_range = memory.clamp(0, num_memories - 1)
    row_of_choice = torch.where(valid, segment_rows.gather(1, in_range), padding_rows).flatten()
    token_of_row = torch.empty_like(row_of_choice)
    token_of_row[row_of_choice] = torch.arange(b * n, device=memory.device) // k
    memory_of_row = torch.empty_like(row_of_choice)
    memory_of_row[row_of_choice] = in_range.flatten()
    offsets = torch.cat([position.new_zeros(1), hot.sum(2).flatten().cumsum(0)])
    return token_of_row, memory_of_row, row_of_choice.view(b, t, k), offsets


dispatch_op = torch.library.custom_op("mom::dispatch", mutates_args=())(dispatch_reference)


@dispatch_op.register_fake
def _(memory_idx, mask, num_memories):
    b, t, k = memory_idx.shape
    n = b * t * k
    return (memory_idx.new_empty(n), memory_idx.new_empty(n), memory_idx.new_empty(b, t, k),
            memory_idx.new_empty(b * num_memories + 1))


def dispatch(
    memory_idx: torch.Tensor, mask: torch.Tensor, num_memories: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the routed choices by (batch, memory).

    memory_idx: [B, T, k] int64, the memories each token chose (distinct per token; a choice
    outside [0, M) is placed with the padding);
    mask: [B, T] bool, False for padding; num_memories: M.
    Returns (token_of_row [B*T*k]: the flat token b*T + t whose choice each packed row holds,
    memory_of_row [B*T*k]: that choice's memory, clamped into [0, M), row_of_choice [B, T, k]: the
    row of each choice, offsets [B*M + 1]: segment b*M + m starts at offsets[b*M + m]).
    The rows' tokens and memories are realised here, once, so that the gathers that build the rows
    load them instead of recomputing them for every element.
    """
    check_tensor("memory_idx", memory_idx, shape=(None, None, None), dtypes=INDEX_DTYPES)
    b, t, _ = memory_idx.shape
    check_tensor("mask", mask, shape=(b, t), dtypes=(torch.bool,))
    num_memories = check_int("num_memories", num_memories, 1)
    check_same_device(memory_idx=memory_idx, mask=mask)
    check_distinct("memory_idx", memory_idx, num_memories, "memories", mask)
    return call(dispatch_op, memory_idx, mask, num_memories)
