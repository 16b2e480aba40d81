"""`call(op, *args)`: a `mom` op called from eager code, straight into its kernel when nothing needs
torch's dispatcher.

An eager decode step is bound by the host, and the dispatcher costs a Python custom op about as
much host time as the Triton launch it wraps (benchmarks/RESULTS.md, `host_overhead.py`). When
nothing needs it (not profiling, `nothing_intercepts()`, plain CPU or CUDA tensors on one device
that autograd need not record) `call` runs the kernel the dispatcher would pick (the op's kernel for that
device, else its default, the reference), and bumps the version counters of the arguments it
mutates, as the dispatcher does. Otherwise it calls the op.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch._library.custom_ops import CustomOpDef

from ._checks import nothing_intercepts

# tensor types that change nothing in dispatch (a Parameter disables torch_function)
PLAIN = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def _mutated(op: CustomOpDef) -> tuple[int, ...]:
    """Positions of the arguments that op writes (its schema's `Tensor(a!)`s)."""
    arguments = op._opoverload._schema.arguments
    return tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)


def _kernel(op: CustomOpDef, args: tuple) -> Callable | None:
    """The kernel the dispatcher would run for args, or None if the call needs the dispatcher."""
    # nothing_intercepts() first: while compiling it ends the test before the profiler's flag is
    # read, which Dynamo would guard on (a profiled call then compiles another graph)
    if not nothing_intercepts() or torch.autograd.profiler._is_profiler_enabled:
        return None
    grad, device = torch.is_grad_enabled(), None
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in PLAIN or (grad and a.requires_grad):
                return None
            kind = "cuda" if a.is_cuda else a.device.type  # is_cuda: no device object made
            if device not in (None, kind):
                return None
            device = kind
    # other devices (meta: the op's fake kernel) and in-place writes to inference tensors (which the
    # dispatcher refuses) go through the dispatcher
    if device not in ("cpu", "cuda") or any(args[i].is_inference() and not torch.is_inference_mode_enabled()
                                            for i in _mutated(op)):
        return None
    kernels = op._backend_fns  # a device's kernel runs the default itself while disabled
    return kernels.get(device, kernels.get(None))


def call(op: CustomOpDef, *args):
    """op(*args), without the dispatcher where nothing needs it (see the module docstring)."""
    kernel = _kernel(op, args)
    if kernel is None:
        return op(*args)
    out = kernel(*args)
    for i in _mutated(op):
        torch.autograd.graph.increment_version(args[i])
    return out
