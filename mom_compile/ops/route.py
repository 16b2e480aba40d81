"""`mom::route`: each token's memories and routing weights from its router logits
(docs/math.md#routing-and-segments). For logits z [..., M], in the compute dtype:
    memory_idx = the topk largest z, largest first, ties to the lower index, NaN ranked smallest
    weights    = softmax of the chosen z (the top k of softmax(z), renormalised)
and with `shared` one more column, memory M (the shared one) with weight 1.

The formula is written for compiled and exported graphs: a pairwise ranking over a handful of
memories, which Inductor fuses into the router's kernel and onnxruntime runs as it is (a sort
would stay a kernel of its own). Eager, it is a dozen small kernels, and an eager decode step is
bound by its launches: so eager inference runs the op (one Triton launch on CUDA), while compiled
and exported graphs, and eager training (whose weights need a gradient), trace the formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_bool, check_int, check_tensor, needs_autograd
from .direct_call import call
from .precision import compute_dtype, upcast


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of the last dim, largest first, ties to the lower index, NaN as
    the smallest (so that any input gives k distinct indices in range), by pairwise comparison."""
    x = torch.where(x == x, x, float("-inf"))
    m = x.shape[-1]
    idx = torch.arange(m, device=x.device)
    x_i, x_j = x[..., :, None], x[..., None, :]
    beats = (x_j > x_i) | ((x_j == x_i) & (idx[None, :] < idx[:, None]))
    # counted in x's float type: onnxruntime's CUDA provider has no int64 ReduceSum, and a step
    # that falls back to the CPU cannot be replayed from a CUDA graph
    rank = beats.to(x.dtype).sum(-1)  # [..., m]: how many come before each one
    picked = rank[..., None, :] == torch.arange(k, device=x.device, dtype=x.dtype)[:, None]
    return (picked * idx.to(x.dtype)).sum(-1).long()  # picked: [..., k, m]


def route_reference(logits: torch.Tensor, topk: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel and the traced formula: (memory_idx [..., k'] int64, weights
    [..., k'] in the compute dtype). The weights are written w_r = 1 / sum_r' exp(z_r' - z_r): no
    sum to a single element, which Inductor would make a kernel of its own when one token is
    decoded."""
    z = upcast(logits)
    memory_idx = top_k(z, topk)  # softmax is monotonic: rank the logits
    chosen = z.gather(-1, memory_idx)
    diff = chosen[..., None, :] - chosen[..., :, None]
    # each weight's own term z_r - z_r is 0 (NaN only for a NaN logit): a chosen logit of -inf
    # would make it -inf - -inf = NaN
    own = torch.eye(diff.shape[-1], dtype=torch.bool, device=diff.device)
    diff = torch.where(own, torch.where(chosen == chosen, 0.0, chosen)[..., :, None], diff)
    weights = 1.0 / diff.exp().sum(-1)
    if shared:
        # padded in float: onnxruntime's CUDA provider runs an int64 Pad on the CPU, and with
        # memory reuse on mishandles an int64 Concat (tests/test_export.py keeps both out)
        memory_idx = F.pad(memory_idx.to(z.dtype), (0, 1), value=z.shape[-1]).long()
        weights = F.pad(weights, (0, 1), value=1.0)
    return memory_idx, weights


route_op = torch.library.custom_op("mom::route", mutates_args=())(route_reference)


@route_op.register_fake
def _(logits, topk, shared):
    shape = (*logits.shape[:-1], topk + int(shared))
    return logits.new_empty(shape, dtype=torch.int64), \
        logits.new_empty(shape, dtype=compute_dtype(logits.dtype))


def route(logits: torch.Tensor, topk: int, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's memories and weights (see the module docstring).

    logits: [..., M] router logits, any float dtype (a strided view is fine: the last dim must be
    contiguous); topk: memories per token, 1..M; shared: append memory M with weight 1.
    Returns (memory_idx [..., topk + shared] int64, weights [..., topk + shared] float32, float64
    for float64 logits).
    """
    check_tensor("logits", logits, shape=(..., None), dtypes=FLOAT_DTYPES)
    topk = check_int("topk", topk, 1, logits.shape[-1])
    shared = check_bool("shared", shared)
    if torch.compiler.is_compiling() or needs_autograd(logits):
        return route_reference(logits, topk, shared)
    return call(route_op, logits, topk, shared)
