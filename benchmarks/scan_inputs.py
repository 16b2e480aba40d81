"""Inputs of the chunk scan op for a given segment layout, at the 340M layer's head sizes unless
told otherwise (shared by the benchmark scripts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_compile.ops.precision import compute_dtype


def scan_inputs(offsets: torch.Tensor, dtype: torch.dtype = torch.bfloat16, h: int = 4, dk: int = 256,
                dv: int = 256) -> tuple[torch.Tensor, ...]:
    """(q, k, v, g, beta) for offsets[-1] rows on offsets' device: unit-norm q and k, log-decays
    in (-0.1, 0] in the inputs' compute dtype (as the states)."""
    n, dev = int(offsets[-1]), offsets.device
    state = compute_dtype(dtype)
    q, k = (F.normalize(torch.randn(n, h, dk, device=dev), dim=-1).to(dtype) for _ in range(2))
    v = torch.randn(n, h, dv, device=dev, dtype=dtype)
    g = -torch.rand(n, h, device=dev, dtype=state) * 0.1
    beta = torch.rand(n, h, device=dev, dtype=dtype)
    return q, k, v, g, beta
