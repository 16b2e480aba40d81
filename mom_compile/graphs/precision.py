"""The precision policy: norms, routing, decays and the state compute in float32 at least
(float64 stays float64, so that float64 runs can serve as the numerical oracle)."""
from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
