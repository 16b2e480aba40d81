"""RMSNorm, computed in float32 at least whatever the input dtype (docs/math.md#precision): the
module; its formula, `rms_norm`, lives with the output norm's op, which uses it too."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.gated_rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`rms_norm` rounded to x's dtype. Eager, with the weight in x's dtype, torch's rms_norm
        does it in one launch (float32 inside, one rounding) where casting around it takes four."""
        if x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps).to(x.dtype)
