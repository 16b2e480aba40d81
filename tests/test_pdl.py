"""Programmatic dependent launch (`ops/pdl.py`): the rule that turns it on, and where the kernels
wait for the kernel ahead of them, read from the PTX Triton emits for Hopper (no GPU needed). A
kernel started early must not touch memory before `griddepcontrol.wait`; the decode step kernel
may only read (its states) before it. The GPU tests run every kernel with PDL on."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mom_compile.ops import pdl  # noqa: E402
from mom_compile.ops.gated_rms_norm_triton import _gated_rms_norm_kernel  # noqa: E402
from mom_compile.ops.memory_decode_triton import _decode_step_kernel  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def test_pdl_is_on_for_compiled_kernels_on_hopper_and_later(monkeypatch):
    def options(device, capability=(9, 0), interpret=False):
        pdl.launch_options.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        monkeypatch.setattr(triton.knobs.runtime, "interpret", interpret)
        return dict(pdl.launch_options(device))

    try:
        assert options(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
        assert options(torch.device("cuda", 0), interpret=True) == {"PDL": False, "launch_pdl": False}
        for capability, on in ((8, 9), False), ((9, 0), True), ((10, 0), True):
            assert options(torch.device("cuda", 1), capability) == {"PDL": on, "launch_pdl": on}
    finally:
        pdl.launch_options.cache_clear()


def ptx_before_and_after_wait(kernel, types: dict, constexprs: dict) -> tuple[list[str], list[str]]:
    """The kernel's global loads and stores in its sm_90 PTX with PDL on (pointers 16-byte aligned,
    as torch allocates them), split at its `griddepcontrol.wait`."""
    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if types.get(n, "").startswith("*")}
    source = ASTSource(kernel, signature, {**constexprs, "PDL": True}, aligned)
    lines = triton.compile(source, target=SM90, options={"num_warps": 4}).asm["ptx"].splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert len(waits) == 1
    memory = [(i, line.strip()) for i, line in enumerate(lines) if "ld.global" in line or "st.global" in line]
    return [x for i, x in memory if i < waits[0]], [x for i, x in memory if i > waits[0]]


def test_a_kernel_touches_memory_only_after_the_kernel_ahead_finished():
    types = dict(y="*bf16", z="*bf16", weight="*bf16", mix="*fp32", out="*bf16", eps="fp32", z_stride="i32")
    before, after = ptx_before_and_after_wait(_gated_rms_norm_kernel, types, dict(
        H=4, V=256, CHOICES=3, HAS_GATE=True, HAS_MIX=True, BLOCK_V=256, COMPUTE=tl.float32))
    assert before == [] and any("st.global" in x for x in after)


def test_the_decode_step_reads_its_states_early_and_writes_after_the_wait():
    types = dict(memory_idx="*i64", qkv="*fp32", beta_g="*fp32", rec_src="*fp32", scale_hi="fp32",
                 scale_lo="fp32", slots="i32", rec_dst="*fp32", o="*fp32")
    before, after = ptx_before_and_after_wait(_decode_step_kernel, types, dict(
        CHOICES=3, H=4, K=256, V=256, BLOCK_K=256, BLOCK_V=32, COMPUTE=tl.float32))
    assert not any("st.global" in x for x in before)
    assert any("ld.global.b64" in x for x in before)  # the memory index
    assert sum("ld.global" in x and ".b64" not in x for x in before) >= 8  # the state tile
    assert any("ld.global" in x for x in after) and any("st.global" in x for x in after)  # q, k, v; o
