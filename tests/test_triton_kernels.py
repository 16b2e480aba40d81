"""The Triton kernels of the `mom` ops against their float64 reference, forward and every gradient.

Two places run them:
- on CUDA, where present: through `torch.ops.mom.*` (so the registration is tested too), at real
  head sizes (64/128/256, expand_v 1 and 2), in float32 and bfloat16;
- on CPU under TRITON_INTERPRET=1, in CI: the interpreter must be switched on before triton is
  imported, so one subprocess runs every interpreter case (`python this_file --interpret`) and
  reports its errors as JSON; tiny float32/float64 shapes keep its numpy execution quick.
The reference is always the CPU kernel of the same op, in float64, on the same (rounded) inputs.
`benchmarks/check_gpu.py` imports `CASES` and `run_case` from here to print the GPU error table.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import mom_compile.ops  # noqa: E402,F401  (registers the ops)

F64 = torch.float64
# (offsets, rows): empty segments, length-1 segments, lengths not a multiple of the chunk size (64),
# rows past offsets[-1], several chunks in one segment.
LAYOUTS = {
    "mixed": ([0, 5, 5, 6, 19, 30], 33),
    "singletons": ([0, 1, 2, 3], 3),
    "all_empty": ([0, 0, 0], 4),
    "long": ([0, 130, 130, 131, 330], 333),
}
# Relative error ||out - ref|| / ||ref|| allowed per input dtype: float64 is rounding only;
# float32 is fp32 arithmetic; bfloat16 adds the rounding of the bf16 outputs and gradients.
TOLERANCE = {F64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


def _rand(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def scan_inputs(layout, h, dk, dv, dtype, device, seed, with_state=True):
    gen = torch.Generator().manual_seed(seed)
    offsets, n = LAYOUTS[layout]
    s = len(offsets) - 1
    state_dtype = F64 if dtype == F64 else torch.float32
    k = F.normalize(torch.randn(n, h, dk, generator=gen, dtype=F64), dim=-1).to(dtype).to(device)
    return dict(
        q=F.normalize(_rand(n, h, dk, dtype=F64, device="cpu", gen=gen), dim=-1).to(dtype).to(device),
        k=k,
        v=_rand(n, h, dv, dtype=dtype, device=device, gen=gen),
        g=(-torch.rand(n, h, generator=gen, dtype=F64) * 0.3).to(state_dtype).to(device),
        beta=torch.rand(n, h, generator=gen, dtype=F64).to(dtype).to(device),
        offsets=torch.tensor(offsets, device=device),
        initial_state=_rand(s, h, dk, dv, dtype=state_dtype, device=device, gen=gen) if with_state else None,
    )


def _to_cpu64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().cpu().double()
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _compare(names, outs, refs) -> dict[str, float]:
    return {name: relative_error(o, r) for name, o, r in zip(names, outs, refs)}


def check_chunk(impl_fwd, impl_bwd, layout, h, dk, dv, dtype, device, seed=0, with_state=True):
    """Forward and backward of the chunked scan vs the float64 CPU reference; returns errors."""
    a = scan_inputs(layout, h, dk, dv, dtype, device, seed, with_state)
    scale = dk ** -0.5
    gen = torch.Generator().manual_seed(seed + 1)
    n_seg = a["offsets"].numel() - 1
    d_o = _rand(*a["v"].shape, dtype=dtype, device=device, gen=gen)
    state_dtype = F64 if dtype == F64 else torch.float32
    d_final = _rand(n_seg, h, dk, dv, dtype=state_dtype, device=device, gen=gen)
    ref_args = {key: _to_cpu64(t) for key, t in a.items()}
    o, final = impl_fwd(**a, scale=scale)
    o_ref, final_ref = torch.ops.mom.chunk_gated_delta(**ref_args, scale=scale)
    grads = impl_bwd(**a, scale=scale, d_o=d_o, d_final=d_final)
    grads_ref = torch.ops.mom.chunk_gated_delta_backward(
        **ref_args, scale=scale, d_o=_to_cpu64(d_o), d_final=_to_cpu64(d_final))
    names = ["dq", "dk", "dv", "dg", "dbeta"] + (["d_initial"] if with_state else [])
    errors = _compare(["o", "final"], (o, final), (o_ref, final_ref))
    errors.update(_compare(names, grads, grads_ref))
    assert o.dtype == a["v"].dtype and final.dtype == (state_dtype if with_state else torch.float32)
    return errors


def check_step(impl, h, dk, dv, dtype, device, seed=0, rows=5):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = F64 if dtype == F64 else torch.float32
    args = [F.normalize(_rand(rows, h, dk, dtype=F64, device="cpu", gen=gen), dim=-1).to(dtype).to(device),
            F.normalize(_rand(rows, h, dk, dtype=F64, device="cpu", gen=gen), dim=-1).to(dtype).to(device),
            _rand(rows, h, dv, dtype=dtype, device=device, gen=gen),
            (-torch.rand(rows, h, generator=gen, dtype=F64)).to(state_dtype).to(device),
            torch.rand(rows, h, generator=gen, dtype=F64).to(dtype).to(device),
            _rand(rows, h, dk, dv, dtype=state_dtype, device=device, gen=gen)]
    o, new = impl(*args, dk ** -0.5)
    o_ref, new_ref = torch.ops.mom.gated_delta_step(*map(_to_cpu64, args), dk ** -0.5)
    return _compare(["o", "new_state"], (o, new), (o_ref, new_ref))


def check_conv(impl_fwd, impl_bwd, layout, d, width, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets, n = LAYOUTS[layout]
    s = len(offsets) - 1
    x = _rand(n, d, dtype=dtype, device=device, gen=gen)
    w = _rand(d, width, dtype=dtype, device=device, gen=gen) * 0.5
    b = _rand(d, dtype=dtype, device=device, gen=gen)
    hist = _rand(s, width - 1, d, dtype=dtype, device=device, gen=gen)
    off = torch.tensor(offsets, device=device)
    d_y = _rand(n, d, dtype=dtype, device=device, gen=gen)
    d_fin = _rand(s, width - 1, d, dtype=dtype, device=device, gen=gen)
    y, fin = impl_fwd(x, w, b, off, hist)
    ref = [_to_cpu64(t) for t in (x, w, b, off, hist)]
    y_ref, fin_ref = torch.ops.mom.segment_conv(*ref)
    grads = impl_bwd(d_y, d_fin, x, w, b, off, hist)
    grads_ref = torch.ops.mom.segment_conv_backward(_to_cpu64(d_y), _to_cpu64(d_fin), *ref)
    errors = _compare(["y", "final"], (y, fin), (y_ref, fin_ref))
    errors.update(_compare(["dx", "dweight", "dbias", "d_initial"], grads, grads_ref))
    return errors


def check_decode(impl, batch, h, dk, dv, with_bias, single_set, dtype, device, seed=0, width=4, chosen=3,
                 slots=5):
    """The in-place decode op vs the float64 reference: o and both state tables after the step.
    q and the projection sets are strided views of one projection row, as the layer passes them;
    the last token is padding (every choice -1) when there are several."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = F64 if dtype == F64 else torch.float32
    c, set_width = 2 * h * dk + h * dv, h * dk + h * dv + 2 * h
    sets = 1 if single_set else slots
    proj = _rand(batch, 3 + h * dk + sets * set_width, dtype=dtype, device=device, gen=gen)
    memory_idx = torch.stack([torch.randperm(slots, generator=gen)[:chosen] for _ in range(batch)])
    if batch > 1:
        memory_idx[-1] = -1
    args = [proj[:, 3:3 + h * dk], proj[:, 3 + h * dk:].unflatten(-1, (sets, set_width)),
            memory_idx.to(device),
            (torch.rand(h, generator=gen, dtype=F64) * 2).to(dtype).to(device),
            _rand(h, dtype=dtype, device=device, gen=gen),
            _rand(c, width, dtype=dtype, device=device, gen=gen) * 0.5,
            _rand(c, dtype=dtype, device=device, gen=gen) if with_bias else None,
            _rand(batch, slots, width - 1, c, dtype=dtype, device=device, gen=gen),
            _rand(batch, slots, h, dk, dv, dtype=state_dtype, device=device, gen=gen)]
    refs = torch.ops.mom.memory_decode(*map(_to_cpu64, args), dk ** -0.5, single_set)
    o = impl(*args, dk ** -0.5, single_set)
    return _compare(["o", "conv_states", "rec_states"], (o, args[7], args[8]), refs)


def check_combine(impl_fwd, impl_bwd, b, t, k, h, dv, dtype, device, seed=0):
    """Combine and its backward vs the float64 reference, rows in a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = F64 if dtype == F64 else torch.float32
    o_rows = _rand(b * t * k, h, dv, dtype=dtype, device=device, gen=gen)
    weights = torch.rand(b, t, k, generator=gen, dtype=F64).to(weight_dtype).to(device)
    row_of_choice = torch.randperm(b * t * k, generator=gen).view(b, t, k).to(device)
    d_y = _rand(b, t, h, dv, dtype=weight_dtype, device=device, gen=gen)
    ref = [_to_cpu64(x) for x in (o_rows, weights, row_of_choice)]
    errors = _compare(["y"], [impl_fwd(o_rows, weights, row_of_choice)], [torch.ops.mom.combine(*ref)])
    errors.update(_compare(["d_rows", "d_weights"], impl_bwd(d_y, o_rows, weights, row_of_choice),
                           torch.ops.mom.combine_backward(_to_cpu64(d_y), *ref)))
    return errors


@contextlib.contextmanager
def fresh_memory_is_nan():
    """torch.empty hands out NaN (deterministic mode's fill of uninitialized memory), so an output
    element that no kernel writes, or a buffer read before it is written, fails the comparison
    instead of passing on memory that happened to hold zeros."""
    from torch._inductor import config as inductor_config  # the mode switch sets its flag too

    mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    inductor = getattr(inductor_config, "deterministic", None)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        if inductor is not None:
            inductor_config.deterministic = inductor


@fresh_memory_is_nan()
def run_case(case: tuple, device: str) -> dict[str, float]:
    """One case of `CASES`/`INTERPRETER_CASES` on `device`: CUDA goes through torch.ops.mom (the
    registered kernels), CPU calls the Triton wrappers directly (under the interpreter)."""
    op, dtype, *rest = case
    via_ops = device != "cpu"
    if op == "chunk":
        from mom_compile.ops import chunk_scan_triton as ct
        fwd = torch.ops.mom.chunk_gated_delta if via_ops else ct.chunk_gated_delta_triton
        bwd = torch.ops.mom.chunk_gated_delta_backward if via_ops else ct.chunk_gated_delta_backward_triton
        layout, h, dk, dv, with_state = rest
        return check_chunk(fwd, bwd, layout, h, dk, dv, dtype, device, with_state=with_state)
    if op == "decode":
        from mom_compile.ops import memory_decode_triton as md
        return check_decode(torch.ops.mom.memory_decode_ if via_ops else md.memory_decode_triton_,
                            *rest, dtype, device)
    if op == "step":
        from mom_compile.ops import state_step_triton as st
        h, dk, dv = rest
        return check_step(torch.ops.mom.gated_delta_step if via_ops else st.gated_delta_step_triton,
                          h, dk, dv, dtype, device)
    if op == "combine":
        from mom_compile.ops import routing_triton as rt
        fwd = torch.ops.mom.combine if via_ops else rt.combine_triton
        bwd = torch.ops.mom.combine_backward if via_ops else rt.combine_backward_triton
        return check_combine(fwd, bwd, *rest, dtype, device)
    from mom_compile.ops import segment_conv_triton as sc
    fwd = torch.ops.mom.segment_conv if via_ops else sc.segment_conv_triton
    bwd = torch.ops.mom.segment_conv_backward if via_ops else sc.segment_conv_backward_triton
    layout, d, width = rest
    return check_conv(fwd, bwd, layout, d, width, dtype, device)


def case_id(case: tuple) -> str:
    return "-".join(str(x).replace("torch.", "") for x in case)


CASES = (
    [("chunk", dt, layout, 2, dk, dk * ev, True)
     for dt in (torch.float32, torch.bfloat16) for dk in (64, 128, 256) for ev in (1, 2)
     for layout in ("mixed", "long")]
    + [("chunk", dt, layout, 2, 64, 64, False) for dt in (torch.float32, torch.bfloat16)
       for layout in ("singletons", "all_empty", "mixed")]
    + [("chunk", F64, "long", 2, 128, 128, True), ("chunk", F64, "long", 2, 256, 256, True)]
    # head sizes between the verified ones run zero-padded (8 -> 64, 96 -> 128, 200 -> 256)
    + [("chunk", dt, "mixed", 2, dk, dv, True) for dt in (torch.float32, torch.bfloat16)
       for dk, dv in ((8, 8), (96, 192), (200, 100))]
    + [("step", dt, 4, dk, dk * ev) for dt in (torch.float32, torch.bfloat16, F64)
       for dk in (64, 128, 256) for ev in (1, 2)]
    + [("conv", dt, layout, d, 4) for dt in (torch.float32, torch.bfloat16, F64)
       for layout in ("mixed", "singletons", "all_empty", "long") for d in (96, 1536)]
    # (B, T, k, H, V): the 340M layer's rows, a partial column block, k = 1, two column blocks
    + [("combine", dt, b, t, k, h, dv) for dt in (torch.float32, torch.bfloat16, F64)
       for b, t, k, h, dv in ((2, 5, 3, 4, 256), (1, 3, 2, 2, 96), (2, 2, 1, 4, 64), (1, 3, 3, 4, 512))]
    # (batch, H, K, V, conv bias, single projection set)
    + [("decode", dt, 3, 4, dk, dk * ev, True, False) for dt in (torch.float32, torch.bfloat16, F64)
       for dk in (64, 128, 256) for ev in (1, 2)]
    + [("decode", dt, 1, 2, 8, 8, False, single) for dt in (torch.float32, torch.bfloat16)
       for single in (False, True)]
    + [("decode", torch.bfloat16, 64, 4, 256, 256, False, False)]  # the 340M layer at batch 64
)
INTERPRETER_CASES = (
    [("chunk", torch.float32, layout, 2, 16, 16 * ev, ws)
     for layout in ("mixed", "singletons", "all_empty") for ev in (1, 2) for ws in (True, False)]
    # float64 runs the same kernels in float64: agreement to rounding proves the algebra exact
    # (without an initial state the final state is float32 by contract, hence with_state only)
    + [("chunk", F64, layout, 2, 16, 16 * ev, True) for layout in ("mixed", "singletons") for ev in (1, 2)]
    # several chunks per segment, a partial last chunk, an empty segment between long ones
    + [("chunk", F64, "long", 1, 16, 16, True), ("chunk", torch.float32, "long", 1, 16, 32, False)]
    # several K- and V-blocks on one grid axis (float64 tiles are 32 wide, state slices 64)
    + [("chunk", F64, "mixed", 1, 64, 128, True)]
    + [("step", dt, 2, 16, 32) for dt in (torch.float32, F64)]
    + [("conv", dt, layout, 40, 4) for dt in (torch.float32, F64) for layout in ("mixed", "all_empty")]
    + [("decode", dt, 3, 2, 16, 32, bias, False) for dt in (torch.float32, F64) for bias in (True, False)]
    + [("decode", F64, 2, 2, 16, 32, True, True)]
    + [("decode", torch.float32, 1, 1, 256, 64, True, False)]  # V-blocks of 8 in the step
    + [("combine", dt, 2, 3, 3, 2, 16) for dt in (torch.float32, F64)]
    + [("combine", F64, 1, 2, 2, 2, 1040)]  # H*V over one column block, the last one partial
)


def assert_within_tolerance(case: tuple, errors: dict[str, float]) -> None:
    tol = TOLERANCE[case[1]]
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"{case_id(case)}: relative errors over {tol}: {bad}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernel_matches_reference(case):
    assert_within_tolerance(case, run_case(case, "cuda"))


@pytest.mark.parametrize("op", ["chunk_gated_delta", "chunk_gated_delta_backward", "gated_delta_step",
                                "segment_conv", "segment_conv_backward", "memory_decode_", "combine",
                                "combine_backward"])
def test_op_has_a_cuda_kernel(op):
    """Each op with a Triton kernel has it registered for CUDA (without it the CUDA cases above
    would compare the reference with itself); a registry query, so it runs without a GPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mom::{op}", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_reaches_triton():
    """torch.ops.mom on CUDA tensors runs the Triton wrapper, not the reference."""
    from mom_compile.ops import chunk_scan_triton as ct
    a = scan_inputs("mixed", 2, 64, 64, torch.float32, "cuda", seed=3)
    o_op, _ = torch.ops.mom.chunk_gated_delta(**a, scale=0.125)
    o_kernel, _ = ct.chunk_gated_delta_triton(**a, scale=0.125)
    assert torch.equal(o_op, o_kernel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state", [(16, 4), (64, 8)], ids=["narrow", "wide"])
@pytest.mark.parametrize("dv", [256, 512])
@fresh_memory_is_nan()
def test_cuda_both_state_pass_configs_match_reference(state, dv):
    """The two state-pass configurations at K=256: [256, 64] slices on 8 warps (bf16's default)
    and [256, 16] on 4 (the default of wider operands), both in bf16 against the reference."""
    from mom_compile.ops import chunk_scan_triton as ct
    config = dict(state_bv=state[0], state_warps=state[1])
    errors = check_chunk(functools.partial(ct.chunk_gated_delta_triton, config=config),
                         functools.partial(ct.chunk_gated_delta_backward_triton, config=config),
                         "long", 2, 256, dv, torch.bfloat16, "cuda")
    assert_within_tolerance(("chunk", torch.bfloat16), errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_scan_is_deterministic_at_layer_shapes(dtype):
    """Forward and backward twice on the same inputs give bit-identical results, at the 340M
    layer's head sizes (K = V = 256, 4 heads) over ~80 chunks. A race inside a kernel (as a
    miscompiled product can be) shows as run-to-run differences before it shows as error against
    the reference, which the small cases above compare to a loose bf16 tolerance."""
    gen = torch.Generator().manual_seed(0)
    lens = [700, 1300, 0, 1, 1000, 2049]
    offsets = torch.tensor([0] + lens).cumsum(0).cuda()
    n, h, d = sum(lens), 4, 256
    q, k = (F.normalize(torch.randn(n, h, d, generator=gen), dim=-1).to(dtype).cuda() for _ in range(2))
    v, d_o = (torch.randn(n, h, d, generator=gen).to(dtype).cuda() for _ in range(2))
    g = (-torch.rand(n, h, generator=gen) * 0.1).cuda()
    beta = torch.rand(n, h, generator=gen).to(dtype).cuda()
    args = (q, k, v, g, beta, offsets, None, d ** -0.5)

    def run():
        return (*torch.ops.mom.chunk_gated_delta(*args),
                *torch.ops.mom.chunk_gated_delta_backward(*args, d_o, None))

    first = run()
    for _ in range(3):
        for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dg", "dbeta", "d_init"], first, run()):
            assert torch.equal(a, b), f"{name} differs between two runs on the same inputs"


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(case, interpreter_results):
    result = interpreter_results[case_id(case)]
    assert isinstance(result, dict), result  # a string is the exception the case raised
    assert_within_tolerance(case, result)


def _interpret_all() -> None:
    """Subprocess entry: every interpreter case on CPU; one JSON line {case id: errors | error}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton loads"
    results = {}
    for case in INTERPRETER_CASES:
        try:
            results[case_id(case)] = run_case(case, "cpu")
        except Exception as exc:  # reported per case by the parent test
            results[case_id(case)] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpret_all()


def test_cuda_entry_pads_heads_to_verified_sizes(monkeypatch):
    """The CUDA entry point launches Triton only at verified head sizes: smaller heads are
    zero-padded up to one, which must not change any output or gradient, and heads wider than
    every verified size take the reference kernel. The launches are replaced by the reference
    (CPU, float64) so that the padding itself is what is checked."""
    from mom_compile.ops import chunk_scan as cs
    from mom_compile.ops import chunk_scan_triton as ct
    launched = []

    def at_verified_size(impl):
        def launch(q, k, v, *args):
            launched.append((k.shape[-1], v.shape[-1]))
            assert k.shape[-1] in ct.VERIFIED_K and v.shape[-1] in ct.VERIFIED_V
            return impl(q, k, v, *args)
        return launch

    monkeypatch.setattr(ct, "chunk_gated_delta_triton", at_verified_size(cs.reference_forward))
    monkeypatch.setattr(ct, "chunk_gated_delta_backward_triton", at_verified_size(cs.reference_backward))
    for dk, dv, padded in ((8, 12, (64, 64)), (96, 300, (128, 512)), (300, 8, None)):
        a = scan_inputs("mixed", 2, dk, dv, F64, "cpu", seed=dk)
        args = [a[name] for name in ("q", "k", "v", "g", "beta", "offsets", "initial_state")] + [0.3]
        d_o, d_final = torch.randn_like(a["v"]), torch.randn_like(a["initial_state"])
        launched.clear()
        outs = ct._cuda_forward(*args) + ct._cuda_backward(*args, d_o, d_final)
        refs = cs.reference_forward(*args) + cs.reference_backward(*args, d_o, d_final)
        assert launched == ([padded] * 2 if padded else [])
        for out, ref in zip(outs, refs):
            assert out.shape == ref.shape and out.is_contiguous()  # as the fake kernels promise
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
