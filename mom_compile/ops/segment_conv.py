"""`mom::segment_conv`: causal depthwise convolution + SiLU, local to each packed segment
(docs/math.md#projections-and-the-short-convolution).

Row n of segment s (position p inside it) gets
    y[n] = silu(bias + sum_{i<W} weight[:, i] * x_s[p - (W-1) + i])
where positions below 0 read the segment's history: initial_state[s] holds the W-1 inputs before
the segment, oldest first. A tap never reaches into another segment. The final state of a segment
is the last W-1 inputs of (history ++ segment), so an empty segment keeps its state. Rows at or
past offsets[-1] belong to no segment and give zero.

Both directions are written as one gather over a source table [x ; history ; 0]: each output row
reads W entries of it (`_taps`), and the final state reads W-1 (`_final_taps`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_offsets, check_same_device, check_tensor
from .direct_call import call
from .precision import compute_dtype


def _segment_of_rows(offsets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id [N] (S for rows outside every segment) and position inside it [N]."""
    rows = torch.arange(n, device=offsets.device)
    seg = torch.searchsorted(offsets[1:], rows, right=True)
    return seg, rows - offsets[seg]  # offsets[S], the rows' end, for those in no segment


def _taps(offsets: torch.Tensor, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-table index [N, W] of every tap of every row, and the mask [N] of rows in a
    segment. Table layout: x rows 0..N-1, then history s*(W-1)+j, then one zero row."""
    n_seg = offsets.numel() - 1
    seg, pos = _segment_of_rows(offsets, n)
    in_segment = seg < n_seg
    back = torch.arange(width - 1, -1, -1, device=offsets.device)  # how far back each tap reads
    rel = pos[:, None] - back[None, :]
    rows = torch.arange(n, device=offsets.device)[:, None] - back[None, :]
    history = n + seg.clamp(max=n_seg - 1)[:, None] * (width - 1) + (width - 1) + rel
    idx = torch.where(rel >= 0, rows, history)
    zero_row = n + n_seg * (width - 1)
    return torch.where(in_segment[:, None], idx, zero_row), in_segment


def _final_taps(offsets: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Source-table index [S, W-1] of each segment's final state."""
    n_seg = offsets.numel() - 1
    lengths = offsets.diff()
    j = torch.arange(width - 1, device=offsets.device)
    rel = lengths[:, None] - (width - 1) + j[None, :]
    rows = offsets[:-1, None] + rel
    history = n + torch.arange(n_seg, device=offsets.device)[:, None] * (width - 1) + (width - 1) + rel
    return torch.where(rel >= 0, rows, history)


def _source_table(x: torch.Tensor, initial_state: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return torch.cat([x.to(dt), initial_state.flatten(0, 1).to(dt), x.new_zeros(1, x.shape[1], dtype=dt)])


def conv_reference(x, weight, bias, offsets, initial_state):
    """Returns (pre-activation z [N, D] in the compute dtype, y = silu(z) masked, final state)."""
    dt = compute_dtype(x.dtype)
    n, width = x.shape[0], weight.shape[1]
    table = _source_table(x, initial_state, dt)
    taps, in_segment = _taps(offsets, n, width)
    z = (torch.einsum("nwd,dw->nd", table[taps], weight.to(dt)) + bias.to(dt)).contiguous()
    y = F.silu(z) * in_segment[:, None]
    final = table[_final_taps(offsets, n, width)]
    return z, y, final


def segment_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor,
    initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel: `conv_reference` with the op's output dtypes."""
    _, y, final = conv_reference(x, weight, bias, offsets, initial_state)
    return y.to(x.dtype), final.to(x.dtype)


segment_conv_op = torch.library.custom_op("mom::segment_conv", mutates_args=())(segment_conv_reference)


@segment_conv_op.register_fake
def _(x, weight, bias, offsets, initial_state):
    return torch.empty_like(x), torch.empty_like(initial_state)


def segment_conv_backward_reference(
    d_y: torch.Tensor, d_final: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, offsets: torch.Tensor, initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's reference kernel: (dx, d_weight, d_bias, d_initial_state)."""
    dt = compute_dtype(x.dtype)
    n, width = x.shape[0], weight.shape[1]
    z, _, _ = conv_reference(x, weight, bias, offsets, initial_state)
    taps, in_segment = _taps(offsets, n, width)
    sig = torch.sigmoid(z)
    d_z = d_y.to(dt) * sig * (1 + z * (1 - sig)) * in_segment[:, None]
    table = _source_table(x, initial_state, dt)
    d_weight = torch.einsum("nwd,nd->dw", table[taps], d_z).contiguous()
    d_table = torch.zeros_like(table)
    d_table.index_add_(0, taps.flatten(), (d_z[:, None, :] * weight.to(dt).t()[None]).flatten(0, 1))
    d_table.index_add_(0, _final_taps(offsets, n, width).flatten(), d_final.to(dt).flatten(0, 1))
    d_init = d_table[n:n + initial_state.shape[0] * (width - 1)].view_as(initial_state)
    return (d_table[:n].to(x.dtype, copy=True), d_weight.to(weight.dtype), d_z.sum(0).to(bias.dtype),
            d_init.to(initial_state.dtype, copy=True))


segment_conv_backward_op = torch.library.custom_op("mom::segment_conv_backward", mutates_args=())(
    segment_conv_backward_reference)


@segment_conv_backward_op.register_fake
def _(d_y, d_final, x, weight, bias, offsets, initial_state):
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(initial_state))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, d_y, d_final):
    x, weight, bias, offsets, initial_state = ctx.saved_tensors
    d_y = torch.zeros_like(x) if d_y is None else d_y
    d_final = torch.zeros_like(initial_state) if d_final is None else d_final
    d_x, d_w, d_b, d_init = torch.ops.mom.segment_conv_backward(
        d_y, d_final, x, weight, bias, offsets, initial_state)
    return d_x, d_w, d_b, None, d_init


segment_conv_op.register_autograd(_backward, setup_context=_setup_context)


def segment_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-local causal depthwise conv + SiLU over packed rows.

    x: [N, D]; weight: [D, W]; bias: [D] or None; offsets: [S + 1] int64;
    initial_state: [S, W-1, D] in x's dtype, or None (zero history).
    Returns (y [N, D], final state [S, W-1, D]), both in x's dtype.
    """
    check_tensor("x", x, shape=(None, None), dtypes=FLOAT_DTYPES)
    n, d = x.shape
    check_tensor("weight", weight, shape=(d, None), dtypes=FLOAT_DTYPES)
    width = weight.shape[1]
    if width < 2:
        raise ValueError(f"weight: expected a kernel width of at least 2, got {width}")
    check_offsets(offsets, n)
    n_seg = offsets.shape[0] - 1
    if bias is None:
        bias = weight.new_zeros(d)
    check_tensor("bias", bias, shape=(d,), dtypes=(weight.dtype,))
    if initial_state is None:
        initial_state = x.new_zeros(n_seg, width - 1, d)
    check_tensor("initial_state", initial_state, shape=(n_seg, width - 1, d), dtypes=(x.dtype,))
    check_same_device(x=x, weight=weight, bias=bias, offsets=offsets, initial_state=initial_state)
    return call(segment_conv_op, x, weight, bias, offsets, initial_state)
