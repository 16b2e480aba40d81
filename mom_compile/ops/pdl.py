"""Programmatic dependent launch (PDL, Hopper and later), shared by every Triton kernel of `mom`.

With PDL a kernel may be started while the kernel ahead of it in the stream is still running:
its programs wait for that kernel to finish (`griddepcontrol.wait`, whose memory it then sees)
before touching anything, then let the kernel after them start. A chain of small kernels (a
decode step, a short prefill, replayed from a CUDA graph) then overlaps each kernel's launch with
the kernel before it instead of paying for it in turn.

Every kernel takes a `PDL` constexpr and calls `enter(PDL)` first; a launcher passes
`**launch_options(device)`. Since a `mom` kernel lets the next one start only after its own wait,
a kernel launched after one may read before `enter` what that one does not write, and nothing
else (`_decode_step_kernel` reads its states early).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def launch_options(device: torch.device) -> Mapping[str, bool]:
    """The `PDL` constexpr and Triton's `launch_pdl` option for a launch on `device` (a tensor's,
    with its index): on where the GPU has PDL (compute capability 9 and later) and Triton compiles
    (not its CPU interpreter). Cached: the eager decode step asks once per launch."""
    on = (device.type == "cuda" and not triton.knobs.runtime.interpret
          and torch.cuda.get_device_capability(device)[0] >= 9)
    return MappingProxyType({"PDL": on, "launch_pdl": on})


@triton.jit
def enter(PDL: tl.constexpr):
    """A kernel's first step: wait until the kernel ahead of it has finished, then let the next
    kernel start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
