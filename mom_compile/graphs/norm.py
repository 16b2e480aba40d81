"""RMSNorm, computed in float32 at least whatever the input dtype (docs/math.md#precision)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, upcast to float32 at least; written in
    the form onnxruntime fuses into one node."""
    x = upcast(x)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)
