"""`mom::gather_rows`: the packed rows' projections (docs/math.md#routing-and-segments).

Row r holds one choice of token t = token[r], which reads projection set s = set_of_row[r]:
    head[r] = q[t] | per_set[t, s, :split]       (the conv's input: q, k and v)
    tail[r] = per_set[t, s, split:]              (what the gates read: beta and alpha)
A row whose set lies outside [0, S) reads zeros from the sets.

The backward sums each token's rows into d_q and gives each (token, set) the gradient of the row
that read it (the sum, where several rows of a token read one set), zeros for the sets no row read.
It finds a token's rows through row_of_choice [N, k] (`dispatch`'s: every row is exactly one
choice, and token[row_of_choice[t, i]] = t), so each output element is written once: no zero-fill
of the sets' gradient, no accumulation into it.

`gather_rows` runs the op in eager mode; when compiling or exporting it traces the reference's
indexing, which Inductor fuses into the projection's other consumers, where the opaque op was
slower (a copy of its strided inputs, an unfused concatenation of the projection's gradient;
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_values,
    check_int,
    check_permutation,
    check_same_device,
    check_tensor,
    values_readable,
)
from .direct_call import call
from .precision import compute_dtype


def _in_range(set_of_row: torch.Tensor, n_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (set_of_row >= 0) & (set_of_row < n_sets)
    return valid, set_of_row.clamp(0, n_sets - 1)


def gather_rows_reference(
    q: torch.Tensor, per_set: torch.Tensor, token: torch.Tensor, set_of_row: torch.Tensor,
    row_of_choice: torch.Tensor, split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel: index, mask, concatenate."""
    valid, s = _in_range(set_of_row, per_set.shape[1])
    proj = torch.where(valid[:, None], per_set[token, s], 0)
    return torch.cat([q[token], proj[:, :split]], dim=-1), proj[:, split:].clone()


gather_rows_op = torch.library.custom_op("mom::gather_rows", mutates_args=())(gather_rows_reference)


@gather_rows_op.register_fake
def _(q, per_set, token, set_of_row, row_of_choice, split):
    r, c = token.shape[0], per_set.shape[2]
    return q.new_empty(r, q.shape[1] + split), q.new_empty(r, c - split)


def gather_rows_backward_reference(
    d_head: torch.Tensor, d_tail: torch.Tensor, token: torch.Tensor, set_of_row: torch.Tensor,
    row_of_choice: torch.Tensor, n_sets: int, split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op's reference kernel: (d_q [N, A], d_per_set [N, S, C]) in d_head's dtype,
    summed over the rows of each token (and set) by index_add in the compute dtype."""
    n, a = row_of_choice.shape[0], d_head.shape[1] - split
    dt = compute_dtype(d_head.dtype)
    valid, s = _in_range(set_of_row, n_sets)
    d_q = d_head.new_zeros(n, a, dtype=dt).index_add_(0, token, d_head[:, :a].to(dt))
    d_proj = torch.cat([d_head[:, a:], d_tail], dim=-1).to(dt) * valid[:, None]
    d_per_set = d_proj.new_zeros(n * n_sets, d_proj.shape[1]).index_add_(0, token * n_sets + s, d_proj)
    return d_q.to(d_head.dtype), d_per_set.view(n, n_sets, -1).to(d_head.dtype)


gather_rows_backward_op = torch.library.custom_op("mom::gather_rows_backward", mutates_args=())(
    gather_rows_backward_reference)


@gather_rows_backward_op.register_fake
def _(d_head, d_tail, token, set_of_row, row_of_choice, n_sets, split):
    n, a = row_of_choice.shape[0], d_head.shape[1] - split
    return d_head.new_empty(n, a), d_head.new_empty(n, n_sets, split + d_tail.shape[1])


def _setup_context(ctx, inputs, output):
    q, per_set, token, set_of_row, row_of_choice, split = inputs
    ctx.save_for_backward(token, set_of_row, row_of_choice)
    ctx.n_sets, ctx.split = per_set.shape[1], split


def _backward(ctx, d_head, d_tail):
    token, set_of_row, row_of_choice = ctx.saved_tensors
    d_q, d_per_set = torch.ops.mom.gather_rows_backward(d_head, d_tail, token, set_of_row, row_of_choice,
                                                        ctx.n_sets, ctx.split)
    return d_q, d_per_set, None, None, None, None


gather_rows_op.register_autograd(_backward, setup_context=_setup_context)


def gather_rows(
    q: torch.Tensor, per_set: torch.Tensor, token: torch.Tensor, set_of_row: torch.Tensor,
    row_of_choice: torch.Tensor, split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed row's token projections: (head [R, A + split], tail [R, C - split]).

    q: [N, A] and per_set: [N, S, C], one row per token, in one float dtype (strided views of one
    projection are fine: the last dim must be contiguous); token and set_of_row: [R] int64, each
    row's token and projection set; row_of_choice: [N, k] int64 with R = N*k, each token's rows
    (`dispatch`'s, flattened over batch and time); split: the columns of a set that go to head.
    """
    check_tensor("q", q, shape=(None, None), dtypes=FLOAT_DTYPES)
    n = q.shape[0]
    check_tensor("per_set", per_set, shape=(n, None, None), dtypes=(q.dtype,))
    check_tensor("row_of_choice", row_of_choice, shape=(n, None), dtypes=INDEX_DTYPES)
    r = n * row_of_choice.shape[1]
    check_tensor("token", token, shape=(r,), dtypes=INDEX_DTYPES)
    check_tensor("set_of_row", set_of_row, shape=(r,), dtypes=INDEX_DTYPES)
    if per_set.shape[1] < 1:
        raise ValueError("per_set: expected at least one projection set, got 0")
    split = check_int("split", split, 0, per_set.shape[2])
    check_same_device(q=q, per_set=per_set, token=token, set_of_row=set_of_row, row_of_choice=row_of_choice)
    check_index_values("token", token, 0, n)
    check_permutation("row_of_choice", row_of_choice)
    if values_readable(token) and values_readable(row_of_choice) and not bool(
            (token[row_of_choice] == torch.arange(n)[:, None]).all()):
        raise ValueError("row_of_choice: expected each token's own rows (token[row_of_choice[t, i]] = t), "
                         "got rows of other tokens")
    if torch.compiler.is_compiling():
        return gather_rows_reference(q, per_set, token, set_of_row, row_of_choice, split)
    return call(gather_rows_op, q, per_set, token, set_of_row, row_of_choice, split)
