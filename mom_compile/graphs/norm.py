"""RMSNorm, computed in float32 at least whatever the input dtype (docs/math.md#precision)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, upcast to float32 at least.

    Eager runs torch's rms_norm (one kernel on CUDA, where the formula launches six: an eager decode
    step is bound by launches); a traced graph keeps the formula, the form onnxruntime fuses into
    one node."""
    x = upcast(x)
    if not torch.compiler.is_compiling():
        return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`rms_norm` rounded to x's dtype. Eager, with the weight in x's dtype, torch's rms_norm
        does it in one launch (float32 inside, one rounding) where casting around it takes four."""
        if x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps).to(x.dtype)
