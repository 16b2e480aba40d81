"""RMSNorm, computed in float32 at least whatever the input dtype (docs/math.md#precision)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, upcast to float32 at least. Written
    in the form onnxruntime fuses into one node, except in float64: the fused node computes in
    float32."""
    x = upcast(x)
    mean_square = x.pow(2).mean(-1, keepdim=True) + eps
    normed = x * torch.rsqrt(mean_square) if x.dtype == torch.float64 else x / torch.sqrt(mean_square)
    return normed * weight.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)
