"""`ops/launch.py`: a compiled kernel is looked up by everything Triton specializes on, so a hit
launches the kernel Triton itself would pick. The GPU test checks the launches' results against
torch, with pointers whose alignment changes between calls (a kernel compiled for 16-byte aligned
pointers vectorizes its loads, which a misaligned view would break)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mom_compile.ops import launch  # noqa: E402


@triton.jit
def _scale_kernel(x, out, n, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, tl.load(x + i, mask=i < n) * scale, mask=i < n)


def test_the_key_tells_apart_what_triton_specializes_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = torch.zeros(64)
    base = launch.key((x, 16, 0.5), {"BLOCK": 64})
    assert launch.key((torch.zeros(64), 16, 0.5), {"BLOCK": 64}) == base  # another aligned tensor
    for args, constexprs in [((x[1:], 16, 0.5), {"BLOCK": 64}),               # misaligned
                             ((x.double(), 16, 0.5), {"BLOCK": 64}),          # dtype
                             ((x, 1, 0.5), {"BLOCK": 64}),                    # an int's value
                             ((x, 16, 0.5), {"BLOCK": 128}),                  # a constexpr
                             ((x, 16, 0.5), {"BLOCK": 64, "num_warps": 8})]:  # an option
        assert launch.key(args, constexprs) != base
    # equal in Python, different kernels in Triton: a bool, an int and a float of the same value
    keys = [launch.key((x, one, 0.5), {"BLOCK": one}) for one in (True, 1, 1.0)]
    assert len(set(keys)) == 3
    assert len({launch.key((x,), {"BLOCK": 64, "FLAG": one}) for one in (True, 1, 1.0)}) == 3
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert launch.key((x, 16, 0.5), {"BLOCK": 64}) != base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_launches_from_the_cache_match_torch():
    launch._compiled.pop(_scale_kernel, None)
    x = torch.randn(4096, device="cuda")
    cases = [(4000, 0, 0), (4000, 0, 0), (4000, 1, 0), (4000, 1, 3), (4000, 1, 3), (37, 0, 0), (37, 0, 0)]
    for n, x_offset, out_offset in cases:  # every case after the first of its key is a hit
        src = x[x_offset:x_offset + n]
        out = torch.full((n + out_offset,), float("nan"), device="cuda")[out_offset:]
        launch.launch(_scale_kernel, (triton.cdiv(n, 256),), src, out, n, 0.5, BLOCK=256)
        torch.testing.assert_close(out, src * 0.5, rtol=0, atol=0)
    assert len(launch._compiled[_scale_kernel]) == 4  # the distinct (alignment, n) pairs
