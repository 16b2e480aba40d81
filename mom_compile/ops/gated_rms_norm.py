"""`mom::gated_rms_norm`: the layer's output norm and gate (docs/math.md#output-norm-and-gate), per head:
    out = rms_norm(y) * silu(z)      rms_norm(y) = y / sqrt(mean(y^2) + eps) * weight
over the last dim of y [..., H, V], z [..., H*V] the output gate's projection (no gate: z None),
in the compute dtype (`precision.py`), rounded once to `dtype`. With `mix` [..., k] the input is k
rows a position, y [..., k, H, V], mixed first: y = sum_i mix[..., i] * y[..., i, :, :] (a decode
step's memory outputs and their routing weights: the combine, in the norm's one launch).

Eager, the formula is six small kernels (the weight's cast, the norm, the gate's upcast, silu, the
product, the cast), and an eager decode step is bound by its launches: so eager inference runs the
op (one Triton launch on CUDA), while compiled and exported graphs, and eager training, trace the
formula, which Inductor fuses and onnxruntime runs as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, check_float, check_same_device, check_tensor, needs_autograd
from .direct_call import call
from .precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, upcast to float32 at least.

    Eager runs torch's rms_norm (one kernel on CUDA, where the formula launches six: an eager decode
    step is bound by launches); a traced graph keeps the formula, the form onnxruntime fuses into
    one node (eps a tensor: an exported Python float would be rounded to float32 first)."""
    x = upcast(x)
    if not torch.compiler.is_compiling():
        return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + x.new_tensor(eps)) * weight.to(x.dtype)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                             dtype: torch.dtype, mix: torch.Tensor | None = None) -> torch.Tensor:
    """The op's reference kernel and the traced formula: out [..., H, V] in `dtype`."""
    if mix is not None:
        y = (upcast(mix)[..., None, None] * upcast(y)).sum(-3)
    o = rms_norm(y, weight, eps)
    if z is not None:
        o = o * F.silu(upcast(z.view(o.shape)))
    return o.to(dtype)


gated_rms_norm_op = torch.library.custom_op("mom::gated_rms_norm", mutates_args=())(gated_rms_norm_reference)


@gated_rms_norm_op.register_fake
def _(y, z, weight, eps, dtype, mix=None):
    return y.new_empty(y.shape if mix is None else y.shape[:-3] + y.shape[-2:], dtype=dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   dtype: torch.dtype, mix: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(y) * silu(z) per head, rounded to `dtype` (see the module docstring).

    y: [..., H, V], any float dtype, or [..., k, H, V] with `mix`; z: [..., H*V] (a strided view
    is fine: the last dim must be contiguous) or None for no gate; weight: [V]; eps: the norm's
    epsilon; mix: [..., k] weights of y's k rows, or None. Returns [..., H, V].
    """
    check_tensor("y", y, shape=(..., None, None), dtypes=FLOAT_DTYPES)
    *lead, h, v = y.shape
    if mix is not None:
        check_tensor("mix", mix, shape=(..., None), dtypes=FLOAT_DTYPES)
        lead = list(mix.shape)
        check_tensor("y", y, shape=(*lead, h, v))
        lead = lead[:-1]
    if z is not None:
        check_tensor("z", z, shape=(*lead, h * v), dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, shape=(v,), dtypes=FLOAT_DTYPES)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    eps = check_float("eps", eps)
    if not torch.compiler.is_compiling() and eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    check_same_device(y=y, z=z, weight=weight, mix=mix)
    if torch.compiler.is_compiling() or needs_autograd(y, z, weight, mix):
        return gated_rms_norm_reference(y, z, weight, eps, dtype, mix)
    return call(gated_rms_norm_op, y, z, weight, eps, dtype, mix)
