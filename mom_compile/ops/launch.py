"""`launch(kernel, grid, *args, **constexprs)`: `kernel[grid](*args, **constexprs)` with less host
time, for the launchers of the eager decode step, which is bound by the host.

On every call Triton's `kernel[grid]` binds and specializes each argument and builds a cache key
before it launches, which takes longer than the launch itself (benchmarks/RESULTS.md,
`host_overhead.py`). `launch` keeps each compiled kernel under a key that holds everything Triton
specializes on, and more (each tensor's dtype and 16-byte alignment, the type and value of every
other argument, constexpr and option, the current device), and on a hit launches it directly
(`CompiledKernel[grid]`). A miss, or Triton's CPU interpreter, goes through `kernel[grid]`. Triton's
global knobs (debug, instrumentation, hooks) are read at a key's first launch only.
"""
from __future__ import annotations

import torch
import triton
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction

MAX_KEYS = 64  # a kernel's keys kept before they are dropped (shapes change rarely in decoding)
_compiled: dict[JITFunction, dict[tuple, tuple]] = {}


def key(args: tuple, constexprs: dict) -> tuple:
    """What a compiled kernel is looked up by, finer than Triton's own specialization so that a hit
    never launches a kernel compiled for other arguments: tensors by dtype and 16-byte alignment,
    anything else by type and value (True, 1 and 1.0 are equal in Python, three kernels in Triton),
    constexprs and options by name too."""
    described = [(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a)
                 for a in args]
    typed = [(type(v), v) for v in constexprs.values()]
    return (torch.cuda.current_device(), *constexprs, *described, *typed)


def launch(kernel: JITFunction, grid: tuple[int, ...], *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs): args positional in the kernel's order (tensors among
    them), then its constexprs and Triton's options (num_warps, launch_pdl) by name."""
    if triton.knobs.runtime.interpret:
        kernel[grid](*args, **constexprs)
        return
    cache = _compiled.setdefault(kernel, {})
    k = key(args, constexprs)
    hit = cache.get(k)
    if hit is not None:
        compiled, tail = hit
        compiled[(*grid, 1, 1)[:3]](*args, *tail)
        return
    compiled = kernel[grid](*args, **constexprs)
    if not isinstance(compiled, CompiledKernel):  # a hook intercepted the launch: nothing to call
        return
    names = kernel.arg_names[len(args):]
    # never cached: a parameter left to its default, a tensor by name (its key would hold the tensor)
    by_name = constexprs.values()
    if all(n in constexprs for n in names) and not any(isinstance(v, torch.Tensor) for v in by_name):
        if len(cache) >= MAX_KEYS:
            cache.clear()
        cache[k] = (compiled, tuple(constexprs[n] for n in names))
