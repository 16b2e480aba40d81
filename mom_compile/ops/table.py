"""The op table: every `mom` custom op with its reference kernel and its CUDA kernel.

One row per op. The CUDA registration below, the tests (registration, opcheck, fake kernels against
references, the Triton kernel cases) and benchmarks/check_gpu.py read it, so adding an op means
its file, its Triton file if any, and one row here.

A missing or broken Triton install is an explicit state, `triton_status()`: the ops' CUDA kernels
are then their references behind a warning (given once, with the reason and the fix), since the
references are correct on CUDA but synchronise with the host and are slow.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..user_warning import warn
from .chunk_gated_delta import (
    chunk_gated_delta_backward_op,
    chunk_gated_delta_op,
    chunk_gated_delta_train_op,
    reference_backward,
    reference_forward,
    reference_forward_train,
)
from .combine import combine_backward_op, combine_backward_reference, combine_op, combine_reference
from .dispatch import dispatch_op, dispatch_reference
from .gated_delta_step import gated_delta_step_op, gated_delta_step_reference
from .gated_rms_norm import gated_rms_norm_op, gated_rms_norm_reference
from .gather_rows import (
    gather_rows_backward_op,
    gather_rows_backward_reference,
    gather_rows_op,
    gather_rows_reference,
)
from .l2_normalize import (
    l2_normalize_backward_op,
    l2_normalize_backward_reference,
    l2_normalize_op,
    l2_normalize_reference,
)
from .memory_decode import decode_reference, decode_reference_, memory_decode_inplace_op, memory_decode_op
from .route import route_op, route_reference
from .segment_conv import (
    segment_conv_backward_op,
    segment_conv_backward_reference,
    segment_conv_op,
    segment_conv_reference,
)

TRITON_FIX = 'pip install "mom-compile[triton]"'


@dataclass(frozen=True)
class Op:
    name: str                 # torch.ops.mom.<name>
    definition: torch.library.CustomOpDef  # its custom op (register_kernel, set_kernel_enabled)
    reference: Callable       # its reference kernel: the CPU kernel and the test oracle
    triton: str | None        # "module:function" of its CUDA kernel in this package; None: the
                              # reference serves every device (stock torch, no host sync)
    eager_only: bool = False  # compiled and exported graphs trace its formula instead, which the
                              # compiler fuses into its neighbours (so it needs no ONNX translation)
    training_only: bool = False  # only autograd graphs hold it (backward ops, a forward that keeps
                                 # residuals for its backward): no inference graph, no ONNX translation

    @property
    def autograd(self) -> bool:
        """Whether it has an autograd formula (`register_autograd`)."""
        return self.definition._backward_fn is not None

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.mom, self.name).default

    def cuda_kernel(self) -> Callable:
        """The Triton CUDA kernel (imports its module, so it raises when Triton cannot load)."""
        module, function = self.triton.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)


OPS: tuple[Op, ...] = (
    Op("chunk_gated_delta", chunk_gated_delta_op, reference_forward,
       "chunk_gated_delta_triton:chunk_gated_delta_cuda"),
    Op("chunk_gated_delta_train", chunk_gated_delta_train_op, reference_forward_train,
       "chunk_gated_delta_triton:chunk_gated_delta_train_cuda", training_only=True),
    Op("chunk_gated_delta_backward", chunk_gated_delta_backward_op, reference_backward,
       "chunk_gated_delta_triton:chunk_gated_delta_backward_cuda", training_only=True),
    Op("gated_delta_step", gated_delta_step_op, gated_delta_step_reference,
       "gated_delta_step_triton:gated_delta_step_triton"),
    Op("segment_conv", segment_conv_op, segment_conv_reference,
       "segment_conv_triton:segment_conv_triton"),
    Op("segment_conv_backward", segment_conv_backward_op, segment_conv_backward_reference,
       "segment_conv_triton:segment_conv_backward_triton", training_only=True),
    Op("route", route_op, route_reference, "route_triton:route_triton", eager_only=True),
    Op("dispatch", dispatch_op, dispatch_reference, "dispatch_triton:dispatch_triton"),
    Op("gather_rows", gather_rows_op, gather_rows_reference, "gather_rows_triton:gather_rows_triton",
       eager_only=True),
    Op("gather_rows_backward", gather_rows_backward_op, gather_rows_backward_reference,
       "gather_rows_triton:gather_rows_backward_triton", training_only=True),
    Op("l2_normalize", l2_normalize_op, l2_normalize_reference, "l2_normalize_triton:l2_normalize_triton",
       eager_only=True),
    Op("l2_normalize_backward", l2_normalize_backward_op, l2_normalize_backward_reference,
       "l2_normalize_triton:l2_normalize_backward_triton", training_only=True),
    Op("combine", combine_op, combine_reference, "combine_triton:combine_triton"),
    Op("combine_backward", combine_backward_op, combine_backward_reference,
       "combine_triton:combine_backward_triton", training_only=True),
    Op("gated_rms_norm", gated_rms_norm_op, gated_rms_norm_reference,
       "gated_rms_norm_triton:gated_rms_norm_triton", eager_only=True),
    Op("memory_decode_", memory_decode_inplace_op, decode_reference_,
       "memory_decode_triton:memory_decode_triton_"),
    # the functional form calls memory_decode_ on copies, so it runs the Triton kernels on CUDA too
    Op("memory_decode", memory_decode_op, decode_reference, None),
)


def op_named(name: str) -> Op:
    return next(op for op in OPS if op.name == name)


@dataclass(frozen=True)
class TritonStatus:
    available: bool  # the ops' CUDA kernels are the Triton kernels
    reason: str = ""  # why not: the error that importing them raised


class WarnOnce:
    """Warns, the first time it is called, that CUDA tensors run the reference kernels."""

    def __init__(self, reason: str) -> None:
        self.reason, self.warned = reason, False

    def __call__(self) -> None:
        if not self.warned:
            self.warned = True
            warn(f"mom_compile: the Triton kernels are unavailable ({self.reason}), so CUDA tensors run "
                 f"the PyTorch reference kernels, which synchronise with the host and are slow; to fix: "
                 f"{TRITON_FIX}", RuntimeWarning)


def reference_on_cuda(op: Op, announce: WarnOnce) -> Callable:
    """op's reference as its CUDA kernel, announced by `announce`."""
    def kernel(*args, **kwargs):
        announce()
        return op.reference(*args, **kwargs)
    return kernel


def _register_cuda_kernels() -> TritonStatus:
    """Register every op's Triton kernel for CUDA, or, when they cannot be imported, its reference
    behind a warning; returns which happened."""
    with_triton = [op for op in OPS if op.triton is not None]
    try:
        kernels = [op.cuda_kernel() for op in with_triton]
        status = TritonStatus(True)
    except Exception as exc:  # not installed, or installed but failing to import: both leave no kernels
        status = TritonStatus(False, f"{type(exc).__name__}: {exc}")
        announce = WarnOnce(status.reason)
        kernels = [reference_on_cuda(op, announce) for op in with_triton]
    for op, kernel in zip(with_triton, kernels):
        op.definition.register_kernel("cuda", kernel)
    return status


_STATUS = _register_cuda_kernels()


def triton_status() -> TritonStatus:
    """Whether the ops' CUDA kernels are the Triton kernels, and if not, why (the import error)."""
    return _STATUS
