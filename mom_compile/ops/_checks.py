"""Argument checks shared by the op wrappers, and their one test of whether autograd must record
a call. The checks read shapes, dtypes and scalars, and index values only where that is free
(`values_readable`), so they cost nothing on the compiled path and raise before a kernel sees bad
input."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch.utils._device import DeviceContext


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
    # plain loops: the decode step checks about 20 tensors a layer, on a host-bound path
    got, first = t.shape, 1 if shape[:1] == (...,) else 0
    n = len(shape) - first
    offset = len(got) - n
    ok = offset >= 0 if first else offset == 0
    if ok:
        for i in range(n):
            s = shape[first + i]
            if s is not None and s != got[offset + i]:
                ok = False
                break
    if not ok:
        want = "[" + ", ".join("..." if s is ... else "*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(got)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record a call on these tensors: grad mode on, and one requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Raise naming ``name`` unless ``value`` is an integer in [low, high] (high None: no bound)."""
    if not isinstance(value, (numbers.Integral, torch.SymInt)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name}: expected {bounds}, got {value}")
    return int(value) if isinstance(value, numbers.Integral) else value


def check_bool(name: str, value) -> bool:
    """Raise naming ``name`` unless ``value`` is True or False (a string such as "false" would be
    taken as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_float(name: str, value) -> float:
    """Raise naming ``name`` unless ``value`` is a finite real number; returns it as a float. Under
    torch.compile it may be symbolic: it passes unchecked."""
    if torch.compiler.is_compiling() or isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a finite number, got {value!r}")
    if not math.isfinite(value):  # the right type, a wrong value
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def nothing_intercepts(devices_only_ok: bool = False) -> bool:
    """Whether torch calls here run as written: no compiler or tracer, no dispatch, function or
    functorch mode. Only then may a wrapper read values (`values_readable`) or skip the dispatcher
    (`direct_call`). devices_only_ok: function modes that only choose new tensors' device
    (`with torch.device(...)`, `torch.set_default_device`) change nothing a check reads."""
    function_modes = torch._C._is_torch_function_mode_enabled() and not (devices_only_ok and all(
        isinstance(m, DeviceContext) for m in torch.overrides._get_current_function_mode_stack()))
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or function_modes
                or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs nothing: a plain CPU tensor where nothing intercepts.
    On CUDA a read would wait for the device, so the kernels there trust the indices and offsets
    that `route` and `dispatch` make."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and nothing_intercepts(devices_only_ok=True)


def check_index_values(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Raise naming ``name`` unless every value of ``t`` is in [low, high) (where readable)."""
    if values_readable(t) and t.numel() and not bool(((t >= low) & (t < high)).all()):
        raise ValueError(f"{name}: expected every value in [{low}, {high}), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")


def check_distinct(name: str, idx: torch.Tensor, high: int, what: str,
                   mask: torch.Tensor | None = None) -> None:
    """Raise naming ``name`` if a row of ``idx`` (its last dim) holds a value in [0, high) twice,
    rows where ``mask`` is False aside (where readable): a token's `what` (memories) are distinct."""
    if not values_readable(idx) or idx.shape[-1] < 2:
        return
    valid = (idx >= 0) & (idx < high) & (True if mask is None else mask[..., None])
    apart = -1 - torch.arange(idx.shape[-1], device=idx.device)  # the others: distinct negatives
    ranked = torch.where(valid, idx, apart).sort(dim=-1).values
    if bool((ranked[..., 1:] == ranked[..., :-1]).any()):
        raise ValueError(f"{name}: expected distinct {what} per token, got one chosen twice")


def check_writable(name: str, t: torch.Tensor) -> None:
    """Raise naming ``name`` if ``t`` is to be written in place but was made under
    torch.inference_mode and that mode is off now (torch would refuse only after a kernel had
    written the other tables)."""
    if not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: made under torch.inference_mode, which is off now, so it cannot be "
                         "updated in place; make it outside inference mode, or decode inside it")


def check_permutation(name: str, t: torch.Tensor) -> None:
    """Raise naming ``name`` unless ``t`` holds each of 0..numel-1 exactly once (where readable)."""
    check_index_values(name, t, 0, t.numel())
    if not values_readable(t) or t.numel() == 0:
        return
    if not bool(torch.bincount(t.flatten(), minlength=t.numel()).eq(1).all()):
        raise ValueError(f"{name}: expected each of 0..{t.numel() - 1} exactly once (a permutation), got "
                         "repeated values")


def check_offsets(offsets: torch.Tensor, n: int) -> None:
    """Segment offsets [S + 1] int64 over n rows: offsets[0] = 0, non-decreasing, offsets[-1] <= n
    (the values where readable)."""
    check_tensor("offsets", offsets, shape=(None,), dtypes=INDEX_DTYPES)
    if offsets.shape[0] < 1:
        raise ValueError("offsets: expected at least one entry (offsets[0] = 0)")
    if values_readable(offsets) and not (offsets[0] == 0 and bool((offsets.diff() >= 0).all())
                                         and offsets[-1] <= n):
        raise ValueError(f"offsets: expected 0 first, non-decreasing, at most the row count {n} last, "
                         f"got {offsets.tolist() if offsets.numel() <= 8 else offsets}")


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
    if dk < 1:
        raise ValueError(f"q: expected a key size (last dim) of at least 1, got shape {list(q.shape)}")
    check_tensor("k", k, shape=(n, h, dk), dtypes=(q.dtype,))
    check_tensor("v", v, shape=(n, h, None), dtypes=(q.dtype,))
    check_tensor("g", g, shape=(n, h), dtypes=STATE_DTYPES)
    check_tensor("beta", beta, shape=(n, h), dtypes=(q.dtype,))
    return n, h, dk, v.shape[-1]


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64,)
