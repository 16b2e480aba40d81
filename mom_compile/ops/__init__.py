"""The MoM primitives as `torch.library` custom ops in namespace `mom`.

Importing this package registers them. Each op has a pure-PyTorch reference kernel (the CPU
kernel and the test oracle), a fake implementation, and an analytic autograd formula (except
`memory_decode`, which serves inference only); the functions below are their checked entry points.
"""
from .chunk_scan import chunk_gated_delta
from .memory_decode import gates, l2_normalize, memory_decode, memory_decode_
from .routing import combine, dispatch
from .segment_conv import segment_conv
from .state_step import gated_delta_step

try:  # Triton kernels become the CUDA kernels of the ops; CPU-only installs keep the references
    from . import (  # noqa: F401
        chunk_scan_triton,
        memory_decode_triton,
        routing_triton,
        segment_conv_triton,
        state_step_triton,
    )
except ImportError:
    pass

__all__ = ["chunk_gated_delta", "combine", "dispatch", "gated_delta_step", "gates", "l2_normalize",
           "memory_decode", "memory_decode_", "segment_conv"]
