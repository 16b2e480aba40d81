"""Each `mom` op against an independent float64 oracle, its gradients against autograd through
that oracle, and torch.library.opcheck."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom_compile import ops
from mom_compile.ops.chunk_gated_delta import chunk_backward_reference, chunk_reference
from mom_compile.ops.precision import compute_dtype
from mom_compile.ops.table import OPS, WarnOnce, op_named, reference_on_cuda

from inputs import (
    LAYOUTS,
    combine_inputs,
    conv_inputs,
    decode_inputs,
    dispatch_inputs,
    gated_norm_inputs,
    gather_inputs,
    on_meta,
    op_inputs,
    route_inputs,
    scan_inputs,
    step_inputs,
)
from oracle import causal_conv, recurrence, segments_recurrence

f64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def oracle_scan(a, scale):
    return segments_recurrence(a["q"], a["k"], a["v"], a["g"], a["beta"], a["offsets"].tolist(),
                               scale, a["initial_state"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [True, False])
def test_chunk_scan_matches_recurrence(layout, with_state):
    a = scan_inputs(layout, with_state=with_state)
    o_ref, f_ref = oracle_scan(a, 0.7)
    o, f = ops.chunk_gated_delta(**a, scale=0.7)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    for chunk in (1, 3, 4):  # the chunked algorithm itself, at chunk sizes that split segments
        o_c, f_c, _, _ = chunk_reference(**a, scale=0.7, chunk_size=chunk)
        torch.testing.assert_close(o_c, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f_c, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [True, False])
def test_training_forward_keeps_chunk_states_and_u(with_state):
    """mom::chunk_gated_delta_train: o and the final state of the recurrence, and its residuals as
    the token-by-token recurrence has them: slot chunk_starts[s] + c holds segment s's state after
    64 c of its rows, row i of v_new the u_i written at row i; unused slots and rows read 0."""
    a = scan_inputs("long", with_state=with_state)
    o, final, starts, v_new = torch.ops.mom.chunk_gated_delta_train(*a.values(), 0.7)
    o_ref, f_ref = oracle_scan(a, 0.7)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, f_ref, rtol=1e-10, atol=1e-10)
    starts_ref, u_ref = torch.zeros_like(starts), torch.zeros_like(v_new)
    offsets, slot = a["offsets"].tolist(), 0
    for s in range(len(offsets) - 1):
        state = a["initial_state"][s].clone() if with_state else torch.zeros_like(starts[0])
        for j in range(offsets[s], offsets[s + 1]):
            if (j - offsets[s]) % 64 == 0:
                starts_ref[slot], slot = state, slot + 1
            state = state * a["g"][j].exp()[:, None, None]
            u_ref[j] = a["beta"][j][:, None] * (a["v"][j] - torch.einsum("hk,hkv->hv", a["k"][j], state))
            state = state + a["k"][j][:, :, None] * u_ref[j][:, None, :]
    assert slot < starts.shape[0] and offsets[-1] < v_new.shape[0]  # the layout has unused entries
    torch.testing.assert_close(starts, starts_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v_new, u_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["mixed", "singletons", "long"])
def test_chunk_scan_gradients_match_autograd_through_recurrence(layout):
    offsets, _ = LAYOUTS[layout]
    a = scan_inputs(layout)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    mine = {k: a[k].clone().requires_grad_() for k in names}
    ref = {k: a[k].clone().requires_grad_() for k in names}
    o, f = ops.chunk_gated_delta(**mine, offsets=a["offsets"], scale=0.5)
    o_ref, f_ref = segments_recurrence(**{k: ref[k] for k in names[:5]}, offsets=offsets, scale=0.5,
                                       initial=ref["initial_state"])
    w_o, w_f = torch.randn_like(o), torch.randn_like(f)
    ((o * w_o).sum() + (f * w_f).sum()).backward()
    ((o_ref * w_o).sum() + (f_ref * w_f).sum()).backward()
    for k in names:
        assert ref[k].grad.abs().sum() > 0, k
        torch.testing.assert_close(mine[k].grad, ref[k].grad, rtol=1e-9, atol=1e-9, msg=k)
    # the backward at a chunk size that splits segments across chunks
    grads = chunk_backward_reference(**{k: a[k] for k in names}, offsets=a["offsets"], scale=0.5,
                                     d_o=w_o, d_final=w_f, chunk_size=4)
    for k, gr in zip(names, grads):
        torch.testing.assert_close(gr, ref[k].grad, rtol=1e-9, atol=1e-9, msg=k)


def test_chunk_scan_in_low_precision_stays_close():
    a = scan_inputs("mixed")
    o_ref, f_ref = oracle_scan(a, 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        low = {k: (t.to(dtype) if k in ("q", "k", "v", "beta") else t) for k, t in a.items()}
        low["g"], low["initial_state"] = a["g"].float(), a["initial_state"].float()
        o, f = ops.chunk_gated_delta(**low, scale=0.5)
        assert o.dtype == dtype and f.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        rel = (o.double() - o_ref).norm() / o_ref.norm()
        assert rel < tol, (dtype, rel)
        rel = (f.double() - f_ref).norm() / f_ref.norm()  # the final state, which feeds a cache
        assert rel < tol, (dtype, "final state", rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scan_from_a_float64_state_computes_in_float64(dtype):
    """Inputs in a low precision with a float64 initial state (a float64 cache): the state's
    arithmetic is float64, so the final state matches the float64 recurrence on the same (rounded)
    inputs to float64's rounding, with a large state, forward and backward."""
    a = scan_inputs("long")
    a["initial_state"] = a["initial_state"] * 1e4
    low = {k: (t.to(dtype) if k in ("q", "k", "v", "beta") else t) for k, t in a.items()}
    low["g"] = a["g"].float()
    ref = {k: (t.double() if t.is_floating_point() else t) for k, t in low.items()}
    o_ref, f_ref = oracle_scan(ref, 0.5)
    o, f = ops.chunk_gated_delta(**low, scale=0.5)
    assert f.dtype == f64
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10 * f_ref.abs().max().item())
    d_final = torch.randn_like(f)
    d_init = chunk_backward_reference(**low, scale=0.5, d_o=torch.zeros_like(o), d_final=d_final)[-1]
    init = ref["initial_state"].clone().requires_grad_()
    (segments_recurrence(*(ref[k] for k in ("q", "k", "v", "g", "beta")), ref["offsets"].tolist(), 0.5,
                         init)[1] * d_final).sum().backward()
    torch.testing.assert_close(d_init, init.grad, rtol=1e-10, atol=1e-10)


def test_step_matches_recurrence_and_gradcheck():
    args = step_inputs(rows=5)
    r = args[0].shape[0]
    o, new = ops.gated_delta_step(*args, 0.6)
    o_ref, new_ref = segments_recurrence(*args[:5], list(range(r + 1)), 0.6, args[5])
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(new, new_ref)
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *x: ops.gated_delta_step(*x, 0.6), args)


@pytest.mark.parametrize("layout", ["mixed", "singletons", "all_empty", "no_segments"])
def test_segment_conv_matches_oracle_with_gradients(layout):
    offsets, n = LAYOUTS[layout]
    x, w, bias, offsets_t, hist = conv_inputs(layout, d=5, width=4)
    mine = [t.clone().requires_grad_() for t in (x, w, bias, hist)]
    ref = [t.clone().requires_grad_() for t in (x, w, bias, hist)]
    y, fin = ops.segment_conv(mine[0], mine[1], mine[2], offsets_t, mine[3])
    y_ref = torch.zeros(n, 5, dtype=f64)
    fins = []
    for i in range(len(offsets) - 1):
        a, b = offsets[i], offsets[i + 1]
        y_seg, f_seg = causal_conv(ref[0][a:b], ref[1], ref[2], ref[3][i])
        y_ref = torch.cat([y_ref[:a], y_seg, y_ref[b:]])
        fins.append(f_seg)
    fin_ref = torch.stack(fins) if fins else ref[3][:0]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(fin, fin_ref)
    w_y, w_f = torch.randn_like(y), torch.randn_like(fin)
    ((y * w_y).sum() + (fin * w_f).sum()).backward()
    ((y_ref * w_y).sum() + (fin_ref * w_f).sum()).backward()
    for name, a, b in zip(("x", "weight", "bias", "initial_state"), mine, ref):
        expect = torch.zeros_like(b) if b.grad is None else b.grad  # unused when no row is in a segment
        torch.testing.assert_close(a.grad, expect, msg=name)


def test_segment_conv_without_history_or_bias_is_zero_padded():
    x, w = torch.randn(7, 3, dtype=f64), torch.randn(3, 2, dtype=f64)
    y, fin = ops.segment_conv(x, w, None, torch.tensor([0, 4, 7]))
    y0, f0 = causal_conv(x[:4], w)
    y1, f1 = causal_conv(x[4:], w)
    torch.testing.assert_close(y, torch.cat([y0, y1]))
    torch.testing.assert_close(fin, torch.stack([f0, f1]))


def dispatch_oracle(memory_idx, mask, num_memories):
    """Rows of each segment b*M+m in time order, built with loops, then every other choice (padding,
    or naming no memory in range) in flat order; and the segment offsets."""
    idx, valid = memory_idx.tolist(), mask.tolist()
    rows, offsets = [], [0]
    for b, (seq, seq_valid) in enumerate(zip(idx, valid)):
        for m in range(num_memories):
            for t, (choices, real) in enumerate(zip(seq, seq_valid)):
                first = (b * len(seq) + t) * len(choices)
                rows += [first + i for i, c in enumerate(choices) if real and c == m]
            offsets.append(len(rows))
    taken = set(rows)
    return rows + [c for c in range(memory_idx.numel()) if c not in taken], offsets


def check_dispatch(memory_idx, mask, num_memories):
    token_of_row, memory_of_row, row_of_choice, offsets = ops.dispatch(memory_idx, mask, num_memories)
    rows, offs = dispatch_oracle(memory_idx.cpu(), mask.cpu(), num_memories)
    k = memory_idx.shape[-1]
    flat = memory_idx.flatten().clamp(0, num_memories - 1).tolist()
    assert offsets.tolist() == offs
    assert row_of_choice.flatten()[rows].tolist() == list(range(len(rows)))
    assert token_of_row.tolist() == [c // k for c in rows]
    assert memory_of_row.tolist() == [flat[c] for c in rows]


@pytest.mark.parametrize("shape", [(2, 5, 2, 4), (1, 3, 3, 3), (3, 16, 2, 4), (2, 1, 1, 4)])
def test_dispatch_is_stable_and_matches_loops(shape):
    b, t, k, m = shape
    check_dispatch(*dispatch_inputs(b, t, k, m, seed=b * t))


def test_dispatch_places_choices_out_of_range_with_the_padding():
    idx, mask, m = dispatch_inputs(2, 6, 2, 4, seed=3)
    idx[0, 1, 0], idx[1, 4, 1], idx[1, 5, 0] = -1, 4, 99
    check_dispatch(idx, mask, m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_on_cuda_matches_the_loops():
    """Enough choices (90K one-hot entries) that the device-wide scan spans many blocks."""
    idx, mask, m = dispatch_inputs(2, 3000, 3, 5, device="cuda", seed=7)
    idx[0, 10, 0], idx[1, 7, 2] = 5, -3
    check_dispatch(idx, mask, m)


def test_dispatch_when_all_tokens_choose_one_memory():
    idx = torch.zeros(2, 6, 1, dtype=torch.int64)
    *_, offsets = ops.dispatch(idx, torch.ones(2, 6, dtype=torch.bool), 3)
    assert offsets.tolist() == [0, 6, 6, 6, 12, 12, 12]


def route_oracle(logits, topk, shared):
    """Per token by loops: the memories sorted by (logit descending, index), NaN last; the float64
    softmax of the chosen logits (NaN when one of them is NaN)."""
    m = logits.shape[-1]
    idx, weights = [], []
    for z in logits.double().reshape(-1, m).tolist():
        key = [float("-inf") if math.isnan(v) else v for v in z]
        chosen = sorted(range(m), key=lambda j: (-key[j], j))[:topk]
        top = max(key[j] for j in chosen)
        e = [math.exp(z[j] - top) for j in chosen]
        idx.append(chosen + [m] * shared)
        weights.append([v / sum(e) for v in e] + [1.0] * shared)
    shape = (*logits.shape[:-1], topk + shared)
    return torch.tensor(idx).view(shape), torch.tensor(weights, dtype=f64).view(shape)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("case", [(3, True, True), (1, False, False), (6, True, True)])
def test_route_matches_loops_with_ties_and_nan(case, device):
    """Eager (the op: on CUDA its Triton kernel) and traced (the formula) routing against the
    loops, on tied logits, a token whose logits are all NaN and one with a NaN among them: exact
    memories, the same NaN weights, the rest to float64 rounding."""
    topk, shared, strided = case
    logits, = route_inputs(m=6, strided=strided, device=device)
    want_idx, want_w = route_oracle(logits.cpu(), topk, shared)
    traced = torch.compile(ops.route, backend="aot_eager", fullgraph=True)
    for fn in (ops.route, traced):
        idx, w = fn(logits, topk, shared)
        assert torch.equal(idx.cpu(), want_idx)
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-12, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_route_weighs_a_chosen_logit_of_minus_infinity_zero(device):
    """A token whose second choice has logit -inf (or both but one): weights 1 and 0, as the
    loops' softmax, eager and traced (the formula's own term, -inf - -inf, must not make a NaN)."""
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf, -inf, 1.0], [-inf, -inf, 2.0, -inf]], dtype=f64, device=device)
    want_idx, want_w = route_oracle(logits.cpu(), 2, True)
    traced = torch.compile(ops.route, backend="aot_eager", fullgraph=True)
    for fn in (ops.route, traced):
        idx, w = fn(logits, 2, True)
        assert torch.equal(idx.cpu(), want_idx)
        torch.testing.assert_close(w.cpu(), want_w, rtol=1e-12, atol=1e-14)


def test_route_checks_its_arguments():
    logits = torch.zeros(2, 4)
    for topk in (0, 5):
        with pytest.raises(ValueError, match="topk: expected an integer in \\[1, 4\\], got"):
            ops.route(logits, topk)
    for topk in (2.0, True):
        with pytest.raises(TypeError, match="topk: expected an integer, got"):
            ops.route(logits, topk)
    with pytest.raises(ValueError, match="logits: expected dtype"):
        ops.route(torch.zeros(2, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"logits: expected shape \[\.\.\., \*\], got \[\]"):
        ops.route(torch.tensor(1.0), 1)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor, got list"):
        ops.route([[0.0, 1.0]], 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("choices", [None, 3])
@pytest.mark.parametrize("gate", [True, False])
def test_gated_rms_norm_matches_its_formula_in_float64(gate, choices, device):
    """Eager (the op: on CUDA its Triton kernel) and traced (the formula) against the formula
    written out in float64, per head, the gate read through its row stride, the rows first mixed
    by their weights with `mix`; bf16 out is that value rounded once."""
    y, z, w, eps, _, mix = gated_norm_inputs(lead=(2, 3), h=2, v=24, gate=gate, choices=choices,
                                             device=device)
    mixed = y if mix is None else sum(mix[..., i, None, None] * y[..., i, :, :] for i in range(choices))
    want = mixed / (mixed.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w
    if gate:
        want = want * (z.view(want.shape) * torch.sigmoid(z.view(want.shape)))
    traced = torch.compile(ops.gated_rms_norm, backend="aot_eager", fullgraph=True)
    for fn in (ops.gated_rms_norm, traced):
        torch.testing.assert_close(fn(y, z, w, eps, f64, mix), want, rtol=1e-12, atol=1e-13)
        got = fn(y, z, w, eps, torch.bfloat16, mix)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)


def test_gated_rms_norm_checks_its_arguments():
    y, z, w, eps, _, _ = gated_norm_inputs()
    with pytest.raises(ValueError, match="z: expected shape"):
        ops.gated_rms_norm(y, z[..., 1:], w, eps, f64)
    with pytest.raises(ValueError, match="weight: expected shape"):
        ops.gated_rms_norm(y, z, w[1:], eps, f64)
    with pytest.raises(ValueError, match="y: expected shape"):
        ops.gated_rms_norm(y[0, 0, 0], None, w, eps, f64)
    with pytest.raises(TypeError, match="y: expected a torch.Tensor, got list"):
        ops.gated_rms_norm(y.tolist(), None, w, eps, f64)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., \*\], got \[\]"):
        ops.l2_normalize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        ops.gated_rms_norm(y, z, w, eps, torch.int64)
    y, z, w, eps, _, mix = gated_norm_inputs(choices=3)
    with pytest.raises(ValueError, match=r"y: expected shape \[2, 3, 3, 2, 5\], got \[2, 3, 2, 2, 5\]"):
        ops.gated_rms_norm(y[..., :2, :, :], z, w, eps, f64, mix)
    with pytest.raises(ValueError, match="z: expected shape"):
        ops.gated_rms_norm(y, z[:, :2], w, eps, f64, mix)
    with pytest.raises(ValueError, match="mix: expected dtype"):
        ops.gated_rms_norm(y, z, w, eps, f64, mix.long())


def test_combine_and_its_gradients():
    o_rows, weights, perm = combine_inputs(b=2, t=3, k=2, h=2, dv=3)
    o_rows, weights, k = o_rows.requires_grad_(), weights.requires_grad_(), perm.shape[-1]
    y = ops.combine(o_rows, weights, perm)
    expect = sum(weights[:, :, i, None, None] * o_rows[perm[:, :, i]] for i in range(k))
    torch.testing.assert_close(y, expect)
    assert torch.autograd.gradcheck(lambda o, w: ops.combine(o, w, perm), (o_rows, weights))


@pytest.mark.parametrize("single_set", [False, True])
def test_gather_rows_and_its_gradients(single_set):
    """Row by row against the definition (q of the row's token | its set's columns; zeros for a set
    out of range), and the gradients by gradcheck through the strided views of one projection."""
    q, per_set, token, set_of_row, row_of_choice, split = gather_inputs(single_set=single_set)
    head, tail = ops.gather_rows(q, per_set, token, set_of_row, row_of_choice, split)
    for r in range(token.shape[0]):
        t, s = token[r].item(), set_of_row[r].item()
        proj = per_set[t, s] if s < per_set.shape[1] else torch.zeros_like(per_set[0, 0])
        assert torch.equal(head[r], torch.cat([q[t], proj[:split]])) and torch.equal(tail[r], proj[split:])
    base = q._base.detach().requires_grad_()
    a = q.shape[1]

    def gathered(proj):
        views = proj[:, 2:2 + a], proj[:, 2 + a:].unflatten(-1, per_set.shape[1:])
        return ops.gather_rows(*views, token, set_of_row, row_of_choice, split)
    assert torch.autograd.gradcheck(gathered, (base,))


def test_l2_normalize_gradients_and_what_it_keeps():
    """Forward and gradient against autograd through the plain formula in float64; in bfloat16 the
    gradient (computed from the rounded output) stays within bfloat16's error of that oracle; and
    the backward keeps the output and one scale per row, no float32 copy of the input."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, 16, dtype=f64, requires_grad=True)
    dy = torch.randn_like(x)
    want = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
    want_dx, = torch.autograd.grad(want, x, dy)
    got = ops.l2_normalize(x)
    got_dx, = torch.autograd.grad(got, x, dy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-12, atol=1e-14)

    xb = x.detach().bfloat16().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        yb = ops.l2_normalize(xb)
    assert sorted(tuple(t.shape) for t in kept) == [(7, 3, 1), (7, 3, 16)]
    assert [t.dtype for t in kept if t.shape == xb.shape] == [torch.bfloat16]
    dxb, = torch.autograd.grad(yb, xb, dy.bfloat16())
    assert dxb.dtype == torch.bfloat16
    torch.testing.assert_close(dxb.double(), want_dx, rtol=3e-2, atol=3e-2 * want_dx.abs().max().item())


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
def test_l2_normalize_traced_gradient(dtype):
    """Compiled graphs trace the norm's formulas instead of the op: on a strided slice (as the layer
    normalises q and k inside the conv's output), their gradient is the float64 oracle's (torch
    2.11's compile drops the gradient of a Function whose saved output aliases itself)."""
    torch.manual_seed(0)
    conv_out = torch.randn(7, 40, dtype=f64, requires_grad=True)
    dy = torch.randn(7, 3, 8, dtype=f64)
    x64 = conv_out[:, 8:32].view(7, 3, 8)
    want_dx, = torch.autograd.grad(x64 / torch.sqrt(x64.pow(2).sum(-1, keepdim=True) + 1e-6), conv_out, dy)
    x = conv_out.detach().to(dtype).requires_grad_()
    norm = torch.compile(lambda t: ops.l2_normalize(t[:, 8:32].view(7, 3, 8)), backend="aot_eager",
                         fullgraph=True)
    got_dx, = torch.autograd.grad(norm(x), x, dy.to(dtype))
    tol = {f64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got_dx.double(), want_dx, rtol=tol, atol=tol * want_dx.abs().max().item())


@pytest.mark.parametrize("single_set", [False, True])
def test_memory_decode_matches_conv_and_recurrence_per_row(single_set):
    """Each chosen (token, memory): the causal conv over [its history; its input], L2-normalised q
    and k, one token of the recurrence from its slot's state; unchosen slots and padding tokens
    keep their states, and the in-place op leaves the tables the functional op returns."""
    h, dk, dv = 2, 4, 3
    args = decode_inputs(h=h, dk=dk, dv=dv, single_set=single_set)
    q, per_set, memory_idx, a_log, dt_bias, weight, bias, conv_states, rec_states = args
    o, conv_new, rec_new = ops.memory_decode(*args, 0.7, single_set)
    conv_expect, rec_expect = conv_states.clone(), rec_states.clone()
    for b, i in torch.cartesian_prod(torch.arange(3), torch.arange(2)).tolist():
        m = int(memory_idx[b, i])
        if m < 0:
            assert o[b, i].eq(0).all()
            continue
        proj = per_set[b, 0 if single_set else m]
        x = torch.cat([q[b], proj[:h * dk + h * dv]])
        beta = 1 / (1 + torch.exp(-proj[-2 * h:-h]))
        g = -a_log.exp() * torch.log1p(torch.exp(proj[-h:] + dt_bias))
        y, hist = causal_conv(x[None], weight, bias, conv_states[b, m])
        qc, kc, vc = y[0].split([h * dk, h * dk, h * dv])
        qc, kc = (t.view(h, dk) / (t.view(h, dk).pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
                  for t in (qc, kc))
        o_r, state = recurrence(qc[None], kc[None], vc.view(1, h, dv), g[None], beta[None], 0.7,
                                rec_states[b, m])
        torch.testing.assert_close(o[b, i], o_r[0])
        conv_expect[b, m], rec_expect[b, m] = hist, state
    torch.testing.assert_close(conv_new, conv_expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(rec_new, rec_expect)
    o_inplace = ops.memory_decode_(*args, 0.7, single_set)
    assert torch.equal(o_inplace, o)
    assert torch.equal(conv_states, conv_new) and torch.equal(rec_states, rec_new)


@pytest.mark.parametrize("sizes", [dict(dk=0), dict(dv=0)])
def test_memory_decode_refuses_heads_without_keys_or_values(sizes):
    """K = 0 or V = 0: one error naming the state table (the CPU kernel could not reshape it, the
    Triton wrapper returned zeros and left the conv history as it was)."""
    args = decode_inputs(**sizes)
    for op in (ops.memory_decode_, ops.memory_decode):
        with pytest.raises(ValueError, match=r"rec_states: expected \[batch, slots, H, K, V\] with H, K"):
            op(*args, 0.7)


def test_memory_decode_copies_tables_of_any_strides_memory_decode_writes_dense_ones():
    """The functional op copies its tables, so any strides do (it returns what the in-place op
    makes of dense copies); the in-place op writes them where they lie and refuses strided ones, on
    every device (its CUDA kernels need them dense)."""
    *args, conv_states, rec_states = decode_inputs()
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (conv_states, rec_states)]
    assert not any(t.is_contiguous() for t in strided)
    o, conv_new, rec_new = ops.memory_decode(*args, *strided, 0.7)
    o_dense = ops.memory_decode_(*args, conv_states, rec_states, 0.7)  # advances the dense tables
    assert torch.equal(o, o_dense) and torch.equal(conv_new, conv_states) and torch.equal(rec_new, rec_states)
    with pytest.raises(ValueError, match="conv_states, rec_states: expected contiguous tables"):
        ops.memory_decode_(*args, *strided, 0.7)


# every op of the table, each case from inputs.op_inputs; the differentiable ops' float inputs
# require gradients, so that opcheck checks their autograd registration too
OPCHECK_CASES = [(op, i) for op in OPS for i in range(len(op_inputs(op.name, torch.float32)))]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[0].name}-{c[1]}")
def test_opcheck(case):
    op, i = case
    args = op_inputs(op.name, torch.float32)[i]
    if op.autograd:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    torch.library.opcheck(op.op, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, f64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_fake_kernel_dtypes_and_shapes_match_reference(op, dtype):
    """Every output of the fake kernel (what torch.compile and torch.export plan with) has the dtype
    and shape of the reference kernel's, for every op and input precision, with and without the
    optional arguments; outputs in a compute dtype follow the precision rule."""
    for args in op_inputs(op.name, dtype):
        real, fake = op.reference(*args), op.op(*on_meta(args))
        real, fake = (out if isinstance(out, tuple) else (out,) for out in (real, fake))
        assert [(t.dtype, t.shape) for t in fake] == [(t.dtype, t.shape) for t in real], op.name
        assert all(t.dtype in (dtype, compute_dtype(dtype), torch.int64) for t in real), op.name


def test_without_triton_cuda_runs_the_reference_and_warns_once():
    """Triton missing is an explicit state: triton_status() says why, and the CUDA kernel of every
    op that has a Triton kernel is then its reference behind one warning naming the reason and the
    fix. The import runs in a subprocess with triton blocked; the fallback kernel, which does not
    depend on the device, is called here on CPU tensors."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, mom_compile.ops as ops\n"
            "from mom_compile.ops.table import OPS\n"
            "s = ops.triton_status()\n"
            "cuda = all(torch._C._dispatch_has_kernel_for_dispatch_key(f'mom::{o.name}', 'CUDA')\n"
            "           for o in OPS if o.triton)\n"
            "print(s.available, cuda, s.reason)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    available, cuda, reason = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (available, cuda) == ("False", "True") and "triton" in reason, proc.stdout

    warn = WarnOnce("ModuleNotFoundError: No module named 'triton'")
    op = op_named("combine")
    kernel = reference_on_cuda(op, warn)
    args = op_inputs("combine", f64)[0]
    with pytest.warns(RuntimeWarning) as record:
        outs = [kernel(*args), kernel(*args)]
    assert len(record) == 1
    message = str(record[0].message)
    assert "No module named 'triton'" in message and 'pip install "mom-compile[triton]"' in message
    for out in outs:
        torch.testing.assert_close(out, op.reference(*args), rtol=0, atol=0)


def ops_backward(dtype, starts, v_new):
    """mom::chunk_gated_delta_backward on a small case, with these residuals."""
    args = op_inputs("chunk_gated_delta_backward", dtype)[0]
    return torch.ops.mom.chunk_gated_delta_backward(*args, starts, v_new)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.chunk_gated_delta(torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.randn(4, 2, 3),
                                   torch.rand(4, 2, dtype=torch.float16), torch.rand(4, 2),
                                   torch.tensor([0, 4])), "g: expected dtype"),
    (lambda: ops.chunk_gated_delta(torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.randn(4, 2, 3),
                                   torch.rand(4, 2), torch.rand(4, 2), torch.tensor([0, 4]),
                                   torch.zeros(2, 2, 3, 3)), r"initial_state: expected shape \[1, 2, 3, 3\]"),
    (lambda: ops.chunk_gated_delta(torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.randn(4, 2, 3),
                                   torch.rand(4, 2), torch.rand(4, 2), torch.tensor([0., 4.])),
     "offsets: expected dtype"),
    (lambda: ops_backward(f64, torch.zeros(6, 2, 4, 3, dtype=f64), None), "starts, v_new: expected both"),
    (lambda: ops_backward(f64, torch.zeros(5, 2, 4, 3, dtype=f64), torch.zeros(33, 2, 3, dtype=f64)),
     r"starts: expected shape \[6, 2, 4, 3\]"),
    (lambda: ops_backward(torch.bfloat16, torch.zeros(6, 2, 4, 3), torch.zeros(33, 2, 3).bfloat16()),
     "starts: expected dtype"),
    (lambda: ops.segment_conv(torch.randn(4, 3), torch.randn(2, 4), None, torch.tensor([0, 4])),
     r"weight: expected shape \[3, \*\]"),
    (lambda: ops.gated_delta_step(torch.randn(2, 1, 3), torch.randn(2, 1, 3), torch.randn(2, 1, 3),
                                  torch.rand(2, 1), torch.rand(2, 1), torch.zeros(2, 1, 3, 3,
                                  dtype=torch.float16), 1.0), "state: expected dtype"),
    (lambda: ops.dispatch(torch.zeros(1, 2, 1, dtype=torch.int64), torch.ones(1, 3, dtype=torch.bool), 2),
     r"mask: expected shape \[1, 2\]"),
    (lambda: ops.gather_rows(*gather_inputs()[:4], torch.zeros(4, 3, dtype=torch.int64), 4),
     r"token: expected shape \[12\]"),
    (lambda: ops.gather_rows(*gather_inputs()[:5], 8), r"split: expected an integer in \[0, 7\], got 8"),
    (lambda: ops.gather_rows(*gather_inputs()[:2], gather_inputs()[2] + 4, *gather_inputs()[3:]),
     r"token: expected every value in \[0, 4\)"),
    (lambda: ops.combine(torch.randn(4, 1, 1), torch.rand(1, 2, 2), torch.arange(4).view(1, 2, 2) * 2),
     r"row_of_choice: expected every value in \[0, 4\), got values in \[0, 6\]"),
    (lambda: ops.combine(torch.ones(4, 1, 1, dtype=torch.int64), torch.rand(1, 2, 2),
                         torch.arange(4).view(1, 2, 2)), "o_rows: expected dtype"),
    (lambda: ops.chunk_gated_delta(*scan_rows(10), torch.tensor([0, 6, 4, 10])), "offsets: expected 0 first, "
     r"non-decreasing, at most the row count 10 last, got \[0, 6, 4, 10\]"),
    (lambda: ops.chunk_gated_delta(*scan_rows(10), torch.tensor([2, 4, 10])), "offsets: expected 0 first"),
    (lambda: ops.chunk_gated_delta(*scan_rows(10), torch.tensor([0, 4, 12])), "offsets: expected 0 first"),
    (lambda: ops.segment_conv(torch.randn(10, 3), torch.randn(3, 4), None, torch.tensor([0, 4, 15])),
     "offsets: expected 0 first"),
    (lambda: ops.memory_decode(*decode_inputs()[:2], decode_inputs()[2] + 5, *decode_inputs()[3:], 1.0),
     r"memory_idx: expected every value in \[-1, 5\)"),
    (lambda: ops.dispatch(torch.zeros(1, 2, 1, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool), 0),
     "num_memories: expected at least 1, got 0"),
    (lambda: ops.combine(torch.randn(5, 1, 1), torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64)),
     "o_rows: expected 4 rows"),
    (lambda: ops.memory_decode_(*decode_inputs()[:2], decode_inputs()[2].int(), *decode_inputs()[3:], 1.0),
     "memory_idx: expected dtype"),
    (lambda: ops.memory_decode_(*decode_inputs()[:7], *decode_inputs(slots=7, h=1)[7:], 1.0),
     r"q: expected shape \[3, 4\]"),
    (lambda: ops.memory_decode(*decode_inputs(slots=4)[:2], *decode_inputs(slots=5)[2:], 1.0),
     "per_set: expected at least 5 projection sets"),
    # index tables whose values are in range but break the contract the kernels rely on
    (lambda: ops.combine(torch.randn(4, 1, 1), torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64)),
     r"row_of_choice: expected each of 0..3 exactly once"),
    (lambda: ops.gather_rows(*gather_inputs()[:4], gather_inputs()[4].flip(0), 4),
     "row_of_choice: expected each token's own rows"),
    (lambda: ops.gather_rows(*gather_inputs()[:4], torch.zeros(4, 2, dtype=torch.int64), 4),
     r"row_of_choice: expected each of 0..7 exactly once"),
    (lambda: ops.memory_decode(*decode_inputs()[:2], torch.tensor([[1, 1], [3, 0], [-1, -1]]),
                               *decode_inputs()[3:], 1.0), "memory_idx: expected distinct slots per token"),
    (lambda: ops.chunk_gated_delta(*(x[..., :0] if x.dim() == 3 else x for x in scan_rows(4)),
                                   torch.tensor([0, 4])), "q: expected a key size"),
    (lambda: ops.gated_rms_norm(*op_inputs("gated_rms_norm", torch.float32)[0][:3], -1.0, torch.float32),
     "eps: expected a number >= 0, got -1.0"),
    (lambda: ops.combine(torch.randn(4, 1, 1, device="meta"), torch.rand(1, 2, 2),
                         torch.arange(4).view(1, 2, 2)),
     "all tensors must be on one device, got o_rows on meta"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    with torch.device("cpu"):  # a function mode that only picks devices: the values are still read
        with pytest.raises(ValueError, match=match):
            call()


def test_a_token_choosing_a_memory_twice_is_refused_by_dispatch():
    """As memory_decode refuses it (a prefill and a decode step would differ): a padding token's
    choices and choices outside [0, M) (placed with the padding) are not counted."""
    mask = torch.tensor([[True, True]])
    with pytest.raises(ValueError, match="memory_idx: expected distinct memories per token"):
        ops.dispatch(torch.tensor([[[1, 1], [0, 1]]]), mask, 2)
    ops.dispatch(torch.tensor([[[1, 1], [0, 1]]]), torch.tensor([[False, True]]), 2)
    ops.dispatch(torch.tensor([[[5, 5], [0, 1]]]), mask, 2)


@pytest.mark.parametrize("call, name", [
    (lambda flag: ops.route(torch.randn(2, 4), 2, flag), "shared"),
    (lambda flag: ops.memory_decode(*decode_inputs(), 1.0, flag), "single_set"),
    (lambda flag: ops.chunk_gated_delta(*scan_rows(4), torch.tensor([0, 4]), keep_states=flag),
     "keep_states"),
])
def test_flags_take_only_true_or_false(call, name):
    """A string such as "false" was taken as true."""
    with pytest.raises(TypeError, match=f"{name}: expected True or False, got 'false'"):
        call("false")


def test_tables_made_in_inference_mode_are_refused_before_any_write():
    """Outside torch.inference_mode, torch refuses to update its tensors only once the kernel runs:
    memory_decode_ had written the conv table when the recurrent one raised."""
    *args, conv, rec = decode_inputs()
    with torch.inference_mode():
        rec = rec.clone()
    before = conv.clone()
    with pytest.raises(ValueError, match="rec_states: made under torch.inference_mode"):
        ops.memory_decode_(*args, conv, rec, 1.0)
    assert torch.equal(conv, before)


def scan_rows(n: int) -> tuple[torch.Tensor, ...]:
    """q, k, v, g, beta of n rows, one head of 3."""
    return (torch.randn(n, 1, 3), torch.randn(n, 1, 3), torch.randn(n, 1, 3), -torch.rand(n, 1),
            torch.rand(n, 1))


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.dispatch(torch.zeros(1, 2, 1, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool), 4.7),
     TypeError, "num_memories: expected an integer, got 4.7"),
    (lambda: ops.gather_rows(*gather_inputs()[:5], 2.5), TypeError, "split: expected an integer, got 2.5"),
    (lambda: ops.gated_delta_step(*scan_rows(2), torch.zeros(2, 1, 3, 3), None),
     TypeError, "scale: expected a finite number, got None"),
    (lambda: ops.memory_decode(*decode_inputs(), float("nan")), ValueError,
     "scale: expected a finite number, got nan"),
    (lambda: ops.gated_rms_norm(*op_inputs("gated_rms_norm", torch.float32)[0][:3], float("inf"),
                                torch.float32), ValueError, "eps: expected a finite number, got inf"),
    (lambda: ops.gated_rms_norm(*op_inputs("gated_rms_norm", torch.float32)[0][:3], None, torch.float32),
     TypeError, "eps: expected a finite number, got None"),
])
def test_bad_scalars_name_the_argument(call, error, match):
    """Not a number: TypeError; a number that cannot be right (NaN, an infinity): ValueError."""
    with pytest.raises(error, match=match):
        call()
