"""`mom::l2_normalize`: y = x * r with r = (sum x^2 + 1e-6)^-1/2 over the last dim
(docs/math.md#projections-and-the-short-convolution), computed in float32 (float64 for float64),
y in x's dtype.

The backward reads the output and r, not x: dx = r * (dy - y * sum(y * dy)). The scan keeps y for
its own backward, so the norm keeps only r, where autograd would keep x and its float32 copy.

`l2_normalize` runs the op (one Triton pass each way on CUDA) in eager mode; when compiling or
exporting it traces the same formulas (`_L2Normalize`), which Inductor fuses into the conv's
consumers and the exporters translate op by op.
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_tensor
from .direct_call import call
from .precision import compute_dtype, upcast

L2_EPS = 1e-6


def _formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r), y a new tensor in x's dtype. No op that may return its input as is (a .to() to the
    same dtype, .contiguous()) is applied to y: under torch 2.11's torch.compile, an autograd
    Function that saves and returns such an alias gets a zero gradient."""
    xf = upcast(x)
    r = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + xf.new_tensor(L2_EPS))  # exported exactly in float64
    y = xf * r
    return (y if y.dtype == x.dtype else y.to(x.dtype)), r


def l2_normalize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference kernel: (y in x's dtype, contiguous, r [..., 1] in the compute dtype)."""
    y, r = _formula(x)
    return y.contiguous(), r


l2_normalize_op = torch.library.custom_op("mom::l2_normalize", mutates_args=())(l2_normalize_reference)


@l2_normalize_op.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty(*x.shape[:-1], 1, dtype=compute_dtype(x.dtype))


def l2_normalize_backward_reference(d_y: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The backward op's reference kernel: dx in d_y's dtype."""
    yf, g = upcast(y), upcast(d_y)
    d_x = r * (g - yf * (yf * g).sum(-1, keepdim=True))
    return d_x.to(d_y.dtype).contiguous()


l2_normalize_backward_op = torch.library.custom_op("mom::l2_normalize_backward", mutates_args=())(
    l2_normalize_backward_reference)


@l2_normalize_backward_op.register_fake
def _(d_y, y, r):
    return torch.empty_like(d_y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    y, r = output
    ctx.mark_non_differentiable(r)
    ctx.save_for_backward(y, r)


def _backward(ctx, d_y, d_r):
    y, r = ctx.saved_tensors
    return torch.ops.mom.l2_normalize_backward(d_y, y, r)


l2_normalize_op.register_autograd(_backward, setup_context=_setup_context)


class _L2Normalize(torch.autograd.Function):
    """The op's formulas for tracing: what torch.compile and the exporters see."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, r = _formula(x)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, d_y: torch.Tensor) -> torch.Tensor:
        return l2_normalize_backward_reference(d_y, *ctx.saved_tensors)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim of x [..., D] (a float dtype; any strides),
    computed in float32 (float64 for float64), returned in x's dtype."""
    check_tensor("x", x, shape=(..., None), dtypes=FLOAT_DTYPES)
    if torch.compiler.is_compiling():
        return _L2Normalize.apply(x)
    return call(l2_normalize_op, x)[0]
