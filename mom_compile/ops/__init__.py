"""The MoM primitives as `torch.library` custom ops in namespace `mom`.

Importing this package registers them. Each op has a pure-PyTorch reference kernel (the CPU
kernel and the test oracle), a fake implementation, and an analytic autograd formula, except
`dispatch` (index outputs), the inference-only ones (the decode ops `memory_decode_` and
`memory_decode`, `route` and `gated_rms_norm`: training traces their formulas) and the `*_backward`
ops, which are the formulas (no double backward). The functions below are their checked entry
points.
`table.OPS` lists the ops with their references and CUDA (Triton) kernels; `triton_status()` says
whether those kernels loaded.
"""
from .chunk_gated_delta import chunk_gated_delta
from .combine import combine
from .dispatch import dispatch
from .gated_delta_step import gated_delta_step
from .gated_rms_norm import gated_rms_norm
from .gather_rows import gather_rows
from .l2_normalize import l2_normalize
from .memory_decode import memory_decode, memory_decode_
from .route import route
from .segment_conv import segment_conv
from .table import TritonStatus, triton_status

__all__ = ["TritonStatus", "chunk_gated_delta", "combine", "dispatch", "gated_delta_step", "gated_rms_norm",
           "gather_rows", "l2_normalize", "memory_decode", "memory_decode_", "route", "segment_conv",
           "triton_status"]
