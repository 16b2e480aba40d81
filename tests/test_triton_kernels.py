"""The Triton kernels of the `mom` ops against their float64 reference, forward and every gradient.

Two places run them:
- on CUDA, where present: through `torch.ops.mom.*` (so the registration is tested too), at real
  head sizes (64/128/256, expand_v 1 and 2), in float32 and bfloat16;
- on CPU under TRITON_INTERPRET=1, in CI: the interpreter must be switched on before triton is
  imported, so one subprocess runs every interpreter case (`python this_file --interpret`) and
  reports its errors as JSON; tiny float32/float64 shapes keep its numpy execution quick.
The reference is always the CPU kernel of the same op, in float64, on the same (rounded) inputs,
and every output's dtype is the one the op's fake kernel promises. The ops come from the op table
(`mom_compile.ops.table.OPS`); the inputs from tests/inputs.py.
`benchmarks/check_gpu.py` imports `CASES` and `run_case` from here to print the GPU error table.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mom_compile.ops import triton_status  # noqa: E402
from mom_compile.ops.precision import compute_dtype  # noqa: E402
from mom_compile.ops.table import OPS, op_named  # noqa: E402

from inputs import (  # noqa: E402
    F64,
    combine_inputs,
    conv_inputs,
    decode_inputs,
    dispatch_inputs,
    gated_norm_inputs,
    gather_inputs,
    l2_inputs,
    on_meta,
    rand,
    route_inputs,
    scan_inputs,
    step_inputs,
)

# Relative error ||out - ref|| / ||ref|| allowed per input dtype: float64 is rounding only;
# float32 is fp32 arithmetic; bfloat16 adds the rounding of the bf16 outputs and gradients; the
# integer outputs of int64 inputs (dispatch's memory indices) must be exact.
TOLERANCE = {F64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.int64: 0.0}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


def _to_cpu64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().cpu().double()
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _compare(names, outs, refs) -> dict[str, float]:
    return {name: relative_error(o, r) for name, o, r in zip(names, outs, refs)}


def _assert_fake_dtypes(op: str, outs, *args) -> None:
    """The kernel's outputs have the dtypes the op's fake kernel (and so its reference, which
    test_ops.py holds to the fake) promises for these very inputs."""
    fake = getattr(torch.ops.mom, op)(*on_meta(args))
    fake = fake if isinstance(fake, tuple) else (fake,)
    outs = outs if isinstance(outs, tuple | list) else (outs,)
    assert [o.dtype for o in outs] == [f.dtype for f in fake], (op, [o.dtype for o in outs])


def check_chunk(impl_fwd, impl_bwd, layout, h, dk, dv, with_state, *, dtype, device, seed=0):
    """Forward and backward of the chunked scan vs the float64 CPU reference; returns errors."""
    a = scan_inputs(layout, h, dk, dv, dtype, device, seed, with_state)
    args = (*a.values(), dk ** -0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    d_o = rand(*a["v"].shape, dtype=dtype, device=device, gen=gen)
    d_final = rand(len(a["offsets"]) - 1, h, dk, dv, dtype=compute_dtype(dtype), device=device, gen=gen)
    outs, grads = impl_fwd(*args), impl_bwd(*args, d_o, d_final)
    _assert_fake_dtypes("chunk_gated_delta", outs, *args)
    _assert_fake_dtypes("chunk_gated_delta_backward", grads, *args, d_o, d_final)
    ref_args = [_to_cpu64(t) for t in args]
    names = ["dq", "dk", "dv", "dg", "dbeta"] + (["d_initial"] if with_state else [])
    errors = _compare(["o", "final"], outs, torch.ops.mom.chunk_gated_delta(*ref_args))
    errors.update(_compare(names, grads, torch.ops.mom.chunk_gated_delta_backward(
        *ref_args, _to_cpu64(d_o), _to_cpu64(d_final))))
    return errors


def check_chunk_train(impl_fwd, layout, h, dk, dv, with_state, *, dtype, device, seed=0):
    """The training forward, its residuals too, and the backward op run from those residuals (as
    strided views) vs the float64 CPU reference; returns errors."""
    a = scan_inputs(layout, h, dk, dv, dtype, device, seed, with_state)
    args = (*a.values(), dk ** -0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    d_o = rand(*a["v"].shape, dtype=dtype, device=device, gen=gen)
    d_final = rand(len(a["offsets"]) - 1, h, dk, dv, dtype=compute_dtype(dtype), device=device, gen=gen)
    outs = impl_fwd(*args)
    # the residuals handed back as strided views of the same values (every other element of a buffer)
    starts, v_new = (x.new_zeros(*x.shape, 2)[..., 0].copy_(x) for x in outs[2:])
    grads = kernel("chunk_gated_delta_backward", device)(*args, d_o, d_final, starts, v_new)
    _assert_fake_dtypes("chunk_gated_delta_train", outs, *args)
    ref_args = [_to_cpu64(t) for t in args]
    names = ["dq", "dk", "dv", "dg", "dbeta"] + (["d_initial"] if with_state else [])
    refs = torch.ops.mom.chunk_gated_delta_train(*ref_args)
    errors = _compare(["o", "final", "starts", "v_new"], outs, refs)
    errors.update(_compare(names, grads, torch.ops.mom.chunk_gated_delta_backward(
        *ref_args, _to_cpu64(d_o), _to_cpu64(d_final))))
    return errors


def check_chunk_table(device: str) -> dict[str, float]:
    """The scan's Triton chunk table against its torch formula (`chunk_starts`, then a
    searchsorted of each slot; the segment order a stable sort by descending chunk count), over
    segment and slot counts past one program of the table kernel and many of its steps, with
    empty segments, equal chunk counts and rows past the last one: the number of entries that
    differ."""
    from mom_compile.ops.chunk_gated_delta import chunk_slots, chunk_starts
    from mom_compile.ops.chunk_gated_delta_triton import TABLE_SEGMENTS, TABLE_SLOTS, chunk_table
    gen = torch.Generator().manual_seed(0)
    wrong = {"starts": 0, "table": 0, "order": 0}
    segment_counts = (1, 5, 80, 300)
    assert segment_counts[-1] > TABLE_SLOTS and segment_counts[-1] > 8 * TABLE_SEGMENTS  # 8+ steps
    for n_seg in segment_counts:
        lengths = torch.randint(0, 300, (n_seg,), generator=gen) * (torch.rand(n_seg, generator=gen) > 0.2)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        n = int(offsets[-1]) + 7
        table, starts, order, slots = chunk_table(offsets.to(device), n)
        ref_starts = chunk_starts(offsets)
        ref_order = torch.sort(ref_starts.diff(), descending=True, stable=True).indices
        slot = torch.arange(chunk_slots(n, n_seg))
        seg = torch.searchsorted(ref_starts[1:], slot, right=True)
        real = seg < n_seg
        first = offsets[seg.clamp(max=n_seg - 1)] + (slot - ref_starts[seg.clamp(max=n_seg - 1)]) * 64
        table = table.cpu()
        wrong["starts"] += int((starts.cpu() != ref_starts).sum())
        wrong["order"] += int((order.cpu() != ref_order).sum())
        wrong["table"] += int((table[:, 0] != torch.where(real, seg, -1)).sum()
                              + (table[real, 1] != first[real]).sum()) + abs(slots - slot.numel())
    return wrong


def check_step(impl, h, dk, dv, *, dtype, device, seed=0, rows=5):
    args = (*step_inputs(rows, h, dk, dv, dtype, device, seed), dk ** -0.5)
    outs = impl(*args)
    _assert_fake_dtypes("gated_delta_step", outs, *args)
    return _compare(["o", "new_state"], outs, torch.ops.mom.gated_delta_step(*map(_to_cpu64, args)))


def check_conv(impl_fwd, impl_bwd, layout, d, width, dx_rows=None, *, dtype, device, seed=0):
    """dx_rows: (rows per block, blocks per program) of `_dx_kernel`, for the CPU launcher only: small
    ones give several programs over the rows, each looping over several blocks."""
    if dx_rows is not None:
        impl_bwd = functools.partial(impl_bwd, config=dict(dx_block_n=dx_rows[0], dx_row_blocks=dx_rows[1]))
    args = conv_inputs(layout, d, width, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_y = rand(*args[0].shape, dtype=dtype, device=device, gen=gen)
    d_fin = rand(*args[-1].shape, dtype=dtype, device=device, gen=gen)
    outs, grads = impl_fwd(*args), impl_bwd(d_y, d_fin, *args)
    _assert_fake_dtypes("segment_conv", outs, *args)
    _assert_fake_dtypes("segment_conv_backward", grads, d_y, d_fin, *args)
    ref = [_to_cpu64(t) for t in args]
    errors = _compare(["y", "final"], outs, torch.ops.mom.segment_conv(*ref))
    errors.update(_compare(["dx", "dweight", "dbias", "d_initial"], grads,
                           torch.ops.mom.segment_conv_backward(_to_cpu64(d_y), _to_cpu64(d_fin), *ref)))
    return errors


def check_decode(impl, batch, h, dk, dv, with_bias, single_set, *, dtype, device, seed=0, width=4):
    """The in-place decode op vs the float64 reference: o and both state tables after the step, at
    3 choices per token over 5 slots."""
    args = (*decode_inputs(batch, h, dk, dv, width, 5, 3, with_bias, single_set, dtype, device, seed),
            dk ** -0.5, single_set)
    refs = torch.ops.mom.memory_decode(*map(_to_cpu64, args))
    o = impl(*args)
    _assert_fake_dtypes("memory_decode_", o, *args)
    return _compare(["o", "conv_states", "rec_states"], (o, args[7], args[8]), refs)


def check_combine(impl_fwd, impl_bwd, b, t, k, h, dv, *, dtype, device, seed=0):
    """Combine and its backward vs the float64 reference, rows in a random permutation."""
    args = combine_inputs(b, t, k, h, dv, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_y = rand(b, t, h, dv, dtype=compute_dtype(dtype), device=device, gen=gen)
    outs, grads = impl_fwd(*args), impl_bwd(d_y, *args)
    _assert_fake_dtypes("combine", outs, *args)
    _assert_fake_dtypes("combine_backward", grads, d_y, *args)
    ref = [_to_cpu64(x) for x in args]
    errors = _compare(["y"], [outs], [torch.ops.mom.combine(*ref)])
    errors.update(_compare(["d_rows", "d_weights"], grads,
                           torch.ops.mom.combine_backward(_to_cpu64(d_y), *ref)))
    return errors


def check_gather(impl_fwd, impl_bwd, n, sets, k, a, c, split, single_set, *, dtype, device, seed=0):
    """Gather and its backward vs the float64 reference: strided projections, rows in a random
    permutation, one row out of range."""
    args = gather_inputs(n, sets, k, a, c, split, single_set, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    r = args[2].shape[0]
    d_head = rand(r, a + split, dtype=dtype, device=device, gen=gen)
    d_tail = rand(r, c - split, dtype=dtype, device=device, gen=gen)
    back = (d_head, d_tail, *args[2:5], sets, split)
    outs, grads = impl_fwd(*args), impl_bwd(*back)
    _assert_fake_dtypes("gather_rows", outs, *args)
    _assert_fake_dtypes("gather_rows_backward", grads, *back)
    errors = _compare(["head", "tail"], outs, torch.ops.mom.gather_rows(*map(_to_cpu64, args)))
    errors.update(_compare(["d_q", "d_per_set"], grads,
                           torch.ops.mom.gather_rows_backward(*map(_to_cpu64, back))))
    return errors


def check_l2(impl_fwd, impl_bwd, n, h, d, strided, *, dtype, device, seed=0):
    """The norm and its backward vs the float64 reference: rows read through their strides, the
    backward fed the reference's own (rounded) y and r."""
    x, = l2_inputs(n, h, d, strided, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    d_y = rand(*x.shape, dtype=dtype, device=device, gen=gen)
    outs = impl_fwd(x)
    _assert_fake_dtypes("l2_normalize", outs, x)
    refs = torch.ops.mom.l2_normalize(_to_cpu64(x))
    y, r = (t.to(o.dtype).to(device) for t, o in zip(refs, outs))
    grads = impl_bwd(d_y, y, r)
    _assert_fake_dtypes("l2_normalize_backward", grads, d_y, y, r)
    errors = _compare(["y", "r"], outs, refs)
    ref_dx = torch.ops.mom.l2_normalize_backward(*map(_to_cpu64, (d_y, y, r)))
    errors.update(_compare(["dx"], [grads], [ref_dx]))
    return errors


def check_dispatch(impl, b, t, k, m, *, dtype, device, seed=0):
    """The rows against the reference's, exactly: ~30% padding tokens, and three choices naming no
    memory in range (placed with the padding)."""
    idx, mask, m = dispatch_inputs(b, t, k, m, seed=seed)
    flat = idx.view(-1)
    out_of_range = torch.tensor([-1, m, m + 7])[:flat.numel()]
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:3]] = out_of_range
    args = (idx.to(dtype).to(device), mask.to(device), m)
    outs = impl(*args)
    _assert_fake_dtypes("dispatch", outs, *args)
    names = ["token_of_row", "memory_of_row", "row_of_choice", "offsets"]
    return _compare(names, outs, torch.ops.mom.dispatch(*(_to_cpu64(a) for a in args)))


def check_route(impl, lead, m, topk, shared, strided, *, dtype, device, seed=0):
    """The memories, exactly (the count that differ), and the weights against the float64
    reference: tied logits, a token of NaN logits and one with a NaN among them (the count of NaN
    weights that differ; the error over the rest)."""
    logits, = route_inputs(lead, m, strided, dtype=dtype, device=device, seed=seed)
    idx, w = impl(logits, topk, shared)
    _assert_fake_dtypes("route", (idx, w), logits, topk, shared)
    ref_idx, ref_w = torch.ops.mom.route(_to_cpu64(logits), topk, shared)
    w, nan = w.cpu(), ref_w.isnan()
    return {"memory_idx": float((idx.cpu() != ref_idx).sum()), "nan_weights": float((w.isnan() != nan).sum()),
            "weights": relative_error(w[~nan], ref_w[~nan])}


def check_gated_rms_norm(impl, lead, h, v, gate, strided, choices, *, dtype, device, seed=0):
    """The gated norm (of `choices` rows mixed, unless None) against the float64 reference, out in
    the input dtype."""
    args = gated_norm_inputs(lead, h, v, gate, strided, choices, dtype=dtype, device=device, seed=seed)
    out = impl(*args)
    _assert_fake_dtypes("gated_rms_norm", out, *args)
    y, z, weight, eps, _, mix = map(_to_cpu64, args)
    return _compare(["out"], [out], [torch.ops.mom.gated_rms_norm(y, z, weight, eps, F64, mix)])


# the check of each op with a Triton kernel; the ops with a backward op check it too
CHECKS = {"chunk_gated_delta": check_chunk, "chunk_gated_delta_train": check_chunk_train,
          "gated_delta_step": check_step, "segment_conv": check_conv,
          "memory_decode_": check_decode, "combine": check_combine, "gather_rows": check_gather,
          "l2_normalize": check_l2, "dispatch": check_dispatch, "route": check_route,
          "gated_rms_norm": check_gated_rms_norm}


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


def kernel(name: str, device: str):
    """The kernel of op `name` to test on `device`: on CUDA the op itself (so that its registration is
    tested too), on CPU its Triton launcher `<name>_triton` (run by the interpreter; an in-place op's,
    like memory_decode_'s, ends in "_" as the op does)."""
    if device != "cpu":
        return getattr(torch.ops.mom, name)
    module = importlib.import_module(f"mom_compile.ops.{op_named(name).triton.split(':')[0]}")
    in_place = "_" if name.endswith("_") else ""
    return getattr(module, f"{name.removesuffix('_')}_triton{in_place}")


@fresh_memory_is_nan()
def run_case(case: tuple, device: str) -> dict[str, float]:
    """One case of `CASES`/`INTERPRETER_CASES` on `device`: (op name, dtype, the check's arguments)."""
    name, dtype, *rest = case
    kernels = [kernel(name, device)]
    if any(op.name == f"{name}_backward" for op in OPS):
        kernels.append(kernel(f"{name}_backward", device))
    return CHECKS[name](*kernels, *rest, dtype=dtype, device=device)


def case_id(case: tuple) -> str:
    return "-".join(str(x).replace("torch.", "") for x in case)


CASES = (
    [("chunk_gated_delta", dt, layout, 2, dk, dk * ev, True)
     for dt in (torch.float32, torch.bfloat16) for dk in (64, 128, 256) for ev in (1, 2)
     for layout in ("mixed", "long")]
    + [("chunk_gated_delta", dt, layout, 2, 64, 64, False) for dt in (torch.float32, torch.bfloat16)
       for layout in ("singletons", "all_empty", "mixed")]
    + [("chunk_gated_delta", F64, "long", 2, dk, dk, True) for dk in (128, 256)]
    # head sizes between the verified ones run zero-padded (8 -> 64, 96 -> 128, 200 -> 256)
    + [("chunk_gated_delta", dt, "mixed", 2, dk, dv, True) for dt in (torch.float32, torch.bfloat16)
       for dk, dv in ((8, 8), (96, 192), (200, 100))]
    # the training forward's residuals and the backward from them (a padded head size last)
    + [("chunk_gated_delta_train", dt, layout, 2, dk, dk, True) for dt in (torch.float32, torch.bfloat16)
       for dk in (64, 256) for layout in ("mixed", "long")]
    + [("chunk_gated_delta_train", torch.bfloat16, layout, 2, 64, 64, False)
       for layout in ("singletons", "all_empty")]
    + [("chunk_gated_delta_train", F64, "long", 2, 128, 128, True),
       ("chunk_gated_delta_train", torch.bfloat16, "mixed", 2, 96, 192, True)]
    + [("gated_delta_step", dt, 4, dk, dk * ev) for dt in (torch.float32, torch.bfloat16, F64)
       for dk in (64, 128, 256) for ev in (1, 2)]
    + [("segment_conv", dt, layout, d, 4) for dt in (torch.float32, torch.bfloat16, F64)
       for layout in ("mixed", "singletons", "all_empty", "long") for d in (96, 1536)]
    # (B, T, k, H, V): the 340M layer's rows, a partial column block, k = 1, two column blocks
    + [("combine", dt, b, t, k, h, dv) for dt in (torch.float32, torch.bfloat16, F64)
       for b, t, k, h, dv in ((2, 5, 3, 4, 256), (1, 3, 2, 2, 96), (2, 2, 1, 4, 64), (1, 3, 3, 4, 512))]
    # (tokens, sets, k, A, C, split, single set): the 340M layer's 5 sets of H*K + H*V + 2H
    # columns, a column block across q and the sets, every row reading set 0
    + [("gather_rows", dt, n, sets, k, a, c, split, single) for dt in (torch.float32, torch.bfloat16, F64)
       for n, sets, k, a, c, split, single in ((300, 5, 3, 1024, 2056, 2048, False),
                                              (7, 3, 2, 200, 90, 70, False), (5, 1, 3, 64, 40, 32, True))]
    # (rows, H, head size, strided): the 340M layer's heads, a head size below a power of two
    + [("l2_normalize", dt, n, h, d, strided) for dt in (torch.float32, torch.bfloat16, F64)
       for n, h, d, strided in ((300, 4, 256, True), (70, 2, 64, False), (33, 3, 200, True))]
    # (batch, H, K, V, conv bias, single projection set)
    + [("memory_decode_", dt, 3, 4, dk, dk * ev, True, False) for dt in (torch.float32, torch.bfloat16, F64)
       for dk in (64, 128, 256) for ev in (1, 2)]
    + [("memory_decode_", dt, 1, 2, 8, 8, False, single) for dt in (torch.float32, torch.bfloat16)
       for single in (False, True)]
    + [("memory_decode_", torch.bfloat16, 64, 4, 256, 256, False, False)]  # the 340M layer at batch 64
    # (leading dims, M, topk, shared, strided): the 340M router decoding one token and 64, a prefill
    # of several programs without the shared memory, 70 memories (one token a program)
    + [("route", dt, lead, m, topk, shared, strided) for dt in (torch.float32, torch.bfloat16, F64)
       for lead, m, topk, shared, strided in (((1, 1), 4, 2, True, True), ((64, 1), 4, 2, True, False),
                                              ((2, 300), 5, 1, False, True), ((3, 7), 70, 5, True, False))]
    # (leading dims, H, V, gate, strided gate, mixed rows): the 340M layer decoding one token (its
    # 3 memories mixed) at batch 1 and 64, a prefill, no gate at V=96, expand_v 2
    + [("gated_rms_norm", dt, *case) for dt in (torch.float32, torch.bfloat16, F64)
       for case in (((1, 1), 4, 256, True, True, 3), ((64, 1), 4, 256, True, True, 3),
                    ((2, 300), 4, 256, True, False, None), ((3,), 2, 96, False, False, None),
                    ((2, 5), 4, 512, True, True, None))]
    # (B, T, k, M): the 340M layer's 5 memory slots at 2K, 32K and a batch-1 prefill; 70 memories
    # (blocks of few choices); one choice a token; more (sequence, memory, block) counts than one
    # step of the running sum takes
    + [("dispatch", torch.int64, b, t, k, m) for b, t, k, m in (
        (16, 2048, 3, 5), (1, 32768, 3, 5), (1, 512, 3, 5), (2, 1500, 2, 70), (4, 9, 1, 4), (300, 3, 2, 4))]
)
INTERPRETER_CASES = (
    [("chunk_gated_delta", torch.float32, layout, 2, 16, 16 * ev, ws)
     for layout in ("mixed", "singletons", "all_empty") for ev in (1, 2) for ws in (True, False)]
    # float64 runs the same kernels in float64: agreement to rounding proves the algebra exact
    + [("chunk_gated_delta", F64, layout, 2, 16, 16 * ev, True) for layout in ("mixed", "singletons")
       for ev in (1, 2)]
    # without an initial state the final state and its gradient are float64 too (the precision rule)
    + [("chunk_gated_delta", F64, "mixed", 2, 16, 16, False)]
    # several chunks per segment, a partial last chunk, an empty segment between long ones
    + [("chunk_gated_delta", F64, "long", 1, 16, 16, True),
       ("chunk_gated_delta", torch.float32, "long", 1, 16, 32, False)]
    # several K- and V-blocks on one grid axis (float64 tiles are 32 wide, state slices 64)
    + [("chunk_gated_delta", F64, "mixed", 1, 64, 128, True)]
    + [("chunk_gated_delta_train", torch.float32, layout, 2, 16, 16, ws) for layout, ws in
       (("mixed", False), ("all_empty", True))]
    + [("chunk_gated_delta_train", F64, "long", 1, 16, 32, True)]
    + [("gated_delta_step", dt, 2, 16, 32) for dt in (torch.float32, F64)]
    + [("segment_conv", dt, layout, 40, 4) for dt in (torch.float32, F64)
       for layout in ("mixed", "all_empty", "long")]
    + [("segment_conv", dt, "long", 40, 4, (2, 3)) for dt in (torch.float32, F64)]
    + [("memory_decode_", dt, 3, 2, 16, 32, bias, False) for dt in (torch.float32, F64)
       for bias in (True, False)]
    + [("memory_decode_", F64, 2, 2, 16, 32, True, True)]
    + [("memory_decode_", torch.float32, 1, 1, 256, 64, True, False)]  # V-blocks of 8 in the step
    + [("combine", dt, 2, 3, 3, 2, 16) for dt in (torch.float32, F64)]
    + [("combine", F64, 1, 2, 2, 2, 1040)]  # H*V over one column block, the last one partial
    + [("gather_rows", dt, 6, 3, 2, 200, 90, 70, False) for dt in (torch.float32, F64)]
    + [("gather_rows", F64, 5, 1, 3, 20, 12, 12, True)]  # one set read thrice a token, an empty tail
    + [("l2_normalize", dt, 37, 3, 24, strided) for dt in (torch.float32, F64) for strided in (True, False)]
    + [("l2_normalize", F64, 4, None, d, True) for d in (0, 8)]  # rows of a 2-D input, empty ones
    + [("dispatch", torch.int64, b, t, k, m)
       for b, t, k, m in ((3, 1900, 3, 5), (2, 150, 2, 70), (260, 3, 2, 4))]
    + [("route", dt, (2, 40), 6, 3, True, True) for dt in (torch.float32, F64)]
    + [("route", torch.float32, (3,), 70, 5, False, False)]
    + [("gated_rms_norm", dt, (2, 3), 2, 24, gate, True, choices) for dt in (torch.float32, F64)
       for gate, choices in ((True, None), (False, None), (True, 3))]
)


def assert_within_tolerance(case: tuple, errors: dict[str, float]) -> None:
    tol = TOLERANCE[case[1]]
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"{case_id(case)}: relative errors over {tol}: {bad}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernel_matches_reference(case):
    assert_within_tolerance(case, run_case(case, "cuda"))


def test_triton_kernels_loaded():
    """With triton installed the ops' CUDA kernels are the Triton kernels, not the reference
    fallback (which would make the CUDA cases above compare the reference with itself)."""
    status = triton_status()
    assert status.available, status.reason


@pytest.mark.parametrize("op", [op for op in OPS if op.triton], ids=lambda op: op.name)
def test_op_has_a_cuda_kernel(op):
    """Each op of the table with a Triton kernel has a CUDA kernel registered; a registry query, so
    it runs without a GPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mom::{op.name}", "CUDA")


@pytest.mark.parametrize("cases", ["CASES", "INTERPRETER_CASES"])
def test_every_triton_kernel_has_cases(cases):
    """Every op of the table with a Triton kernel is checked here, itself or as a backward op."""
    checked = {case[0] for case in globals()[cases]}
    checked |= {f"{name}_backward" for name in checked}
    assert {op.name for op in OPS if op.triton} <= checked


@pytest.mark.parametrize("cases", ["CASES", "INTERPRETER_CASES"])
def test_dispatch_cases_cover_every_block_size(cases):
    """The dispatch cases run blocks of 64 several to a sequence, blocks grown past 64 to keep the
    (sequence, block) count within MAX_BLOCKS, and blocks at the one-hot tile's cap with more
    pairs than that; one of them with more (sequence, category, block) counts than one step of
    the running sum."""
    from mom_compile.ops.dispatch_triton import MAX_BLOCKS, SCAN_TILE, block_size
    kinds = set()
    for _, _, b, t, k, m in (case for case in globals()[cases] if case[0] == "dispatch"):
        cats = 1 << m.bit_length()  # the next power of two above m
        block = block_size(b, t * k, cats)
        per_sequence = -(-t * k // block)
        cap = block_size(MAX_BLOCKS + 1, 1, cats)  # more sequences than MAX_BLOCKS: the cap
        kinds.add("64" if block == 64 and per_sequence > 1 else "grown" if 64 < block < cap else
                  "cap" if block == cap and b * per_sequence > MAX_BLOCKS else "other")
        if b * (m + 1) * per_sequence > SCAN_TILE:
            kinds.add("steps")
    assert {"64", "grown", "cap", "steps"} <= kinds


def test_split_scale_rebuilds_the_scale_from_two_float32s():
    """Triton passes Python floats as float32: the head is the scale rounded to float32, and head
    plus float32 remainder give back the scale to about 2^-48 relative (float64 kernels need it)."""
    from mom_compile.ops.triton_precision import split_scale
    for scale in (256 ** -0.5, 96 ** -0.5, 1 / 3, 0.3, 7.0):
        hi, lo = split_scale(scale)
        assert hi == float(torch.tensor(scale, dtype=torch.float32))
        lo32 = float(torch.tensor(lo, dtype=torch.float32))
        assert abs(hi + lo32 - scale) <= 2.0 ** -46 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_reaches_triton():
    """torch.ops.mom on CUDA tensors runs the Triton wrapper, not the reference."""
    from mom_compile.ops.chunk_gated_delta_triton import chunk_gated_delta_triton
    a = scan_inputs("mixed", 2, 64, 64, torch.float32, "cuda", seed=3)
    o_op, _ = torch.ops.mom.chunk_gated_delta(**a, scale=0.125)
    o_kernel, _ = chunk_gated_delta_triton(**a, scale=0.125)
    assert torch.equal(o_op, o_kernel)


def test_state_slices_narrow_where_wide_ones_would_leave_sms_idle(monkeypatch):
    """At K = V = 256 in bf16 the state passes take [256, 32] slices (forward on 4 warps, backward
    on 8) when segments x heads x V/64 is below the SM count, [256, 64] on 8 warps otherwise, and
    where no GPU runs the kernels (no SM count)."""
    from mom_compile.ops import chunk_gated_delta_triton as scan

    def state_config(segments: int, sms: int | None) -> tuple:
        monkeypatch.setattr(scan, "_sm_count", lambda device: sms)
        few = scan.few_programs(segments, 4, 256, torch.device("cuda"))
        config = scan.default_config(256, 256, 2, few)
        return config["state_bv"], config["state_warps"], config["state_bwd_warps"]

    assert state_config(8, 132) == (32, 4, 8)  # 128 wide programs
    assert state_config(9, 132) == (64, 8, 8)  # 144
    assert state_config(8, None) == (64, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state", [(16, 4, 4), (32, 4, 8), (64, 8, 8)], ids=["narrow", "middle", "wide"])
@pytest.mark.parametrize("dv", [256, 512])
@fresh_memory_is_nan()
def test_cuda_state_pass_configs_match_reference(state, dv):
    """The state-pass configurations at K=256, in bf16 against the reference: [256, 64] slices on
    8 warps (bf16's default), [256, 16] on 4 (the default of wider operands), and [256, 32] on 4
    warps forward and 8 backward (bf16's default where the passes have fewer programs than SMs)."""
    from mom_compile.ops import chunk_gated_delta_triton as ct
    config = dict(state_bv=state[0], state_warps=state[1], state_bwd_warps=state[2])
    errors = check_chunk(functools.partial(ct.chunk_gated_delta_triton, config=config),
                         functools.partial(ct.chunk_gated_delta_backward_triton, config=config),
                         "long", 2, 256, dv, True, dtype=torch.bfloat16, device="cuda")
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


# one pytest-xdist worker runs every interpreted case: the subprocess behind them runs once
INTERPRETED = pytest.mark.xdist_group("triton_interpreter")


@INTERPRETED
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(case, interpreter_results):
    result = interpreter_results[case_id(case)]
    assert isinstance(result, dict), result  # a string is the exception the case raised
    assert_within_tolerance(case, result)


@INTERPRETED
def test_interpreted_chunk_table_matches_its_formula(interpreter_results):
    assert interpreter_results["chunk_table"] == {"starts": 0, "table": 0, "order": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunk_table_matches_its_formula():
    assert check_chunk_table("cuda") == {"starts": 0, "table": 0, "order": 0}


def _interpret_all() -> None:
    """Subprocess entry: every interpreter case on CPU, and the chunk table; one JSON line
    {case id: errors | error}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton loads"
    results = {}
    try:
        results["chunk_table"] = check_chunk_table("cpu")
    except Exception as exc:  # reported by the parent test
        results["chunk_table"] = f"{type(exc).__name__}: {exc}"
    for case in INTERPRETER_CASES:
        try:
            results[case_id(case)] = run_case(case, "cpu")
        except Exception as exc:  # reported per case by the parent test
            results[case_id(case)] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpret_all()


def test_cuda_entry_pads_heads_to_verified_sizes(monkeypatch):
    """The CUDA entry points launch Triton only at verified head sizes: smaller heads are
    zero-padded up to one, which must not change any output, residual or gradient, and heads wider than
    every verified size take the reference kernel. The launches are replaced by the reference
    (CPU, float64) so that the padding itself is what is checked."""
    from mom_compile.ops import chunk_gated_delta_triton as ct
    from mom_compile.ops.chunk_gated_delta import (
        reference_backward,
        reference_forward,
        reference_forward_train,
    )
    launched = []

    def at_verified_size(impl):
        def launch(q, k, v, *args):
            launched.append((k.shape[-1], v.shape[-1]))
            assert k.shape[-1] in ct.VERIFIED_K and v.shape[-1] in ct.VERIFIED_V
            return impl(q, k, v, *args)
        return launch

    monkeypatch.setattr(ct, "chunk_gated_delta_triton", at_verified_size(reference_forward))
    monkeypatch.setattr(ct, "chunk_gated_delta_train_triton", at_verified_size(reference_forward_train))
    monkeypatch.setattr(ct, "chunk_gated_delta_backward_triton", at_verified_size(reference_backward))
    for dk, dv, padded in ((8, 12, (64, 64)), (96, 300, (128, 512)), (300, 8, None)):
        a = scan_inputs("mixed", 2, dk, dv, F64, "cpu", seed=dk)
        args = [a[name] for name in ("q", "k", "v", "g", "beta", "offsets", "initial_state")] + [0.3]
        d_o, d_final = torch.randn_like(a["v"]), torch.randn_like(a["initial_state"])
        launched.clear()
        train = ct.chunk_gated_delta_train_cuda(*args)
        outs = (ct.chunk_gated_delta_cuda(*args) + train
                + ct.chunk_gated_delta_backward_cuda(*args, d_o, d_final, *train[2:]))
        refs = (reference_forward(*args) + reference_forward_train(*args)
                + reference_backward(*args, d_o, d_final))
        assert launched == ([padded] * 3 if padded else [])
        for out, ref in zip(outs, refs):
            assert out.shape == ref.shape and out.is_contiguous()  # as the fake kernels promise
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
