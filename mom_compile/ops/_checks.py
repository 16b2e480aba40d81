"""Argument checks shared by the op wrappers: they read only shapes and dtypes, never values, so
they cost nothing on the compiled path and raise before a kernel sees bad input."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    shape: Sequence,
    dtypes: Sequence[torch.dtype] | None = None,
) -> None:
    """Raise a ValueError naming ``name`` unless ``t`` has ``shape`` (None = any size; a leading
    ``...`` = any number of leading dims) and a dtype from ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    lead = shape[:1] == (...,)
    tail = tuple(shape[1:]) if lead else tuple(shape)
    dims_ok = t.dim() >= len(tail) if lead else t.dim() == len(tail)
    if not dims_ok or any(s is not None and s != d for s, d in zip(tail, t.shape[t.dim() - len(tail):])):
        want = "[" + ", ".join("..." if s is ... else "*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_rows(q, k, v, g, beta) -> tuple[int, int, int, int]:
    """The gated delta rule's per-row inputs (q, k [N, H, K]; v [N, H, V]; g [N, H] float32 or
    float64; beta [N, H], q's dtype for all but g). Returns (N, H, K, V)."""
    check_tensor("q", q, shape=(None, None, None), dtypes=FLOAT_DTYPES)
    n, h, dk = q.shape
    check_tensor("k", k, shape=(n, h, dk), dtypes=(q.dtype,))
    check_tensor("v", v, shape=(n, h, None), dtypes=(q.dtype,))
    check_tensor("g", g, shape=(n, h), dtypes=STATE_DTYPES)
    check_tensor("beta", beta, shape=(n, h), dtypes=(q.dtype,))
    return n, h, dk, v.shape[-1]


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64,)
