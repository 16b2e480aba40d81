"""Each `mom` op against an independent float64 oracle, its gradients against autograd through
that oracle, and torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mom_compile import ops
from mom_compile.ops.chunk_scan import chunk_backward_reference, chunk_reference

from oracle import causal_conv, recurrence, segments_recurrence

f64 = torch.float64

# Segment layouts: empty segments, length-1 segments, lengths not a multiple of the chunk, tail rows
# outside every segment, one long segment (several chunks of 64).
LAYOUTS = {
    "mixed": ([0, 5, 5, 6, 19, 30], 33),
    "singletons": ([0, 1, 2, 3], 3),
    "all_empty": ([0, 0, 0], 4),
    "long": ([0, 150, 151], 151),
}


def scan_inputs(offsets, n, h=2, dk=4, dv=3, dtype=f64, with_state=True):
    s = len(offsets) - 1
    return dict(
        q=torch.randn(n, h, dk, dtype=dtype),
        k=F.normalize(torch.randn(n, h, dk, dtype=dtype), dim=-1),
        v=torch.randn(n, h, dv, dtype=dtype),
        g=-torch.rand(n, h, dtype=f64 if dtype == f64 else torch.float32) * 0.5,
        beta=torch.rand(n, h, dtype=dtype),
        offsets=torch.tensor(offsets),
        initial_state=torch.randn(s, h, dk, dv, dtype=f64 if dtype == f64 else torch.float32)
        if with_state else None,
    )


def oracle_scan(a, scale):
    return segments_recurrence(a["q"], a["k"], a["v"], a["g"], a["beta"], a["offsets"].tolist(),
                               scale, a["initial_state"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [True, False])
def test_chunk_scan_matches_recurrence(layout, with_state):
    offsets, n = LAYOUTS[layout]
    a = scan_inputs(offsets, n, with_state=with_state)
    o_ref, f_ref = oracle_scan(a, 0.7)
    o, f = ops.chunk_gated_delta(**a, scale=0.7)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-10)
    for chunk in (1, 3, 4):  # the chunked algorithm itself, at chunk sizes that split segments
        o_c, f_c, _ = chunk_reference(**a, scale=0.7, chunk_size=chunk)
        torch.testing.assert_close(o_c, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f_c, f_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["mixed", "singletons", "long"])
def test_chunk_scan_gradients_match_autograd_through_recurrence(layout):
    offsets, n = LAYOUTS[layout]
    a = scan_inputs(offsets, n)
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
    offsets, n = LAYOUTS["mixed"]
    a = scan_inputs(offsets, n)
    o_ref, f_ref = oracle_scan(a, 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        low = {k: (t.to(dtype) if k in ("q", "k", "v", "beta") else t) for k, t in a.items()}
        low["g"], low["initial_state"] = a["g"].float(), a["initial_state"].float()
        o, f = ops.chunk_gated_delta(**low, scale=0.5)
        assert o.dtype == dtype and f.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        rel = (o.double() - o_ref).norm() / o_ref.norm()
        assert rel < tol, (dtype, rel)


def test_step_matches_recurrence_and_gradcheck():
    r, h, dk, dv = 5, 2, 4, 3
    args = [torch.randn(r, h, dk, dtype=f64), F.normalize(torch.randn(r, h, dk, dtype=f64), dim=-1),
            torch.randn(r, h, dv, dtype=f64), -torch.rand(r, h, dtype=f64),
            torch.rand(r, h, dtype=f64), torch.randn(r, h, dk, dv, dtype=f64)]
    o, new = ops.gated_delta_step(*args, 0.6)
    o_ref, new_ref = segments_recurrence(*args[:5], list(range(r + 1)), 0.6, args[5])
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(new, new_ref)
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *x: ops.gated_delta_step(*x, 0.6), args)


@pytest.mark.parametrize("layout", ["mixed", "singletons", "all_empty"])
def test_segment_conv_matches_oracle_with_gradients(layout):
    offsets, n = LAYOUTS[layout]
    s, d, width = len(offsets) - 1, 5, 4
    x, w, bias = torch.randn(n, d, dtype=f64), torch.randn(d, width, dtype=f64), torch.randn(d, dtype=f64)
    hist = torch.randn(s, width - 1, d, dtype=f64)
    mine = [t.clone().requires_grad_() for t in (x, w, bias, hist)]
    ref = [t.clone().requires_grad_() for t in (x, w, bias, hist)]
    y, fin = ops.segment_conv(mine[0], mine[1], mine[2], torch.tensor(offsets), mine[3])
    y_ref = torch.zeros(n, d, dtype=f64)
    fins = []
    for i in range(s):
        a, b = offsets[i], offsets[i + 1]
        y_seg, f_seg = causal_conv(ref[0][a:b], ref[1], ref[2], ref[3][i])
        y_ref = torch.cat([y_ref[:a], y_seg, y_ref[b:]])
        fins.append(f_seg)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(fin, torch.stack(fins))
    w_y, w_f = torch.randn_like(y), torch.randn_like(fin)
    ((y * w_y).sum() + (fin * w_f).sum()).backward()
    ((y_ref * w_y).sum() + (torch.stack(fins) * w_f).sum()).backward()
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
    """Rows of each segment b*M+m in time order, built with loops."""
    b_size, t_size, k = memory_idx.shape
    rows, offsets = [], [0]
    for b in range(b_size):
        for m in range(num_memories):
            for t in range(t_size):
                for i in range(k):
                    if mask[b, t] and memory_idx[b, t, i] == m:
                        rows.append((b * t_size + t) * k + i)
            offsets.append(len(rows))
    return rows, offsets


@pytest.mark.parametrize("shape", [(2, 5, 2, 4), (1, 3, 3, 3), (3, 16, 2, 4), (2, 1, 1, 4)])
def test_dispatch_is_stable_and_matches_loops(shape):
    b, t, k, m = shape
    idx = torch.stack([torch.randperm(m)[:k] for _ in range(b * t)]).view(b, t, k)
    mask = torch.rand(b, t) > 0.3
    choice_of_row, row_of_choice, offsets = ops.dispatch(idx, mask, m)
    rows, offs = dispatch_oracle(idx, mask, m)
    assert offsets.tolist() == offs
    assert choice_of_row[:len(rows)].tolist() == rows
    assert sorted(choice_of_row.tolist()) == list(range(b * t * k))
    assert (choice_of_row[row_of_choice.flatten()] == torch.arange(b * t * k)).all()


def test_dispatch_when_all_tokens_choose_one_memory():
    idx = torch.zeros(2, 6, 1, dtype=torch.int64)
    _, _, offsets = ops.dispatch(idx, torch.ones(2, 6, dtype=torch.bool), 3)
    assert offsets.tolist() == [0, 6, 6, 6, 12, 12, 12]


def test_combine_and_its_gradients():
    b, t, k, h, dv = 2, 3, 2, 2, 3
    o_rows = torch.randn(b * t * k, h, dv, dtype=f64, requires_grad=True)
    weights = torch.rand(b, t, k, dtype=f64, requires_grad=True)
    perm = torch.randperm(b * t * k).view(b, t, k)
    y = ops.combine(o_rows, weights, perm)
    expect = sum(weights[:, :, i, None, None] * o_rows[perm[:, :, i]] for i in range(k))
    torch.testing.assert_close(y, expect)
    assert torch.autograd.gradcheck(lambda o, w: ops.combine(o, w, perm), (o_rows, weights))


def decode_inputs(batch=3, chosen=2, slots=5, h=2, dk=4, dv=3, width=3, dtype=f64, single_set=False):
    """Arguments of the decode ops up to the scale: token 0 chooses slot 0 (the shared slot of a
    single set), the last token is padding (every choice -1)."""
    state_dtype = f64 if dtype == f64 else torch.float32
    c = 2 * h * dk + h * dv
    memory_idx = torch.stack([torch.randperm(slots)[:chosen] for _ in range(batch)])
    memory_idx[0, 0], memory_idx[-1] = 0, -1
    memory_idx[0, 1:] = memory_idx[0, 1:].clamp(min=1)
    return [torch.randn(batch, h * dk, dtype=dtype),
            torch.randn(batch, 1 if single_set else slots, h * dk + h * dv + 2 * h, dtype=dtype),
            memory_idx, torch.rand(h, dtype=dtype) * 2, torch.randn(h, dtype=dtype),
            torch.randn(c, width, dtype=dtype), torch.randn(c, dtype=dtype),
            torch.randn(batch, slots, width - 1, c, dtype=dtype),
            torch.randn(batch, slots, h, dk, dv, dtype=state_dtype)]


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


def opcheck_cases():
    a = scan_inputs([0, 3, 3, 7], 8, dtype=torch.float32)
    conv_x = torch.randn(8, 4, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(6)]).view(2, 3, 2)
    grad = dict(requires_grad=True)
    return [
        (torch.ops.mom.chunk_gated_delta.default,
         (a["q"].requires_grad_(), a["k"].requires_grad_(), a["v"].requires_grad_(),
          a["g"].requires_grad_(), a["beta"].requires_grad_(), a["offsets"],
          a["initial_state"].requires_grad_(), 0.5)),
        (torch.ops.mom.chunk_gated_delta.default,
         (a["q"], a["k"], a["v"], a["g"], a["beta"], a["offsets"], None, 0.5)),
        (torch.ops.mom.gated_delta_step.default,
         (torch.randn(3, 2, 4, **grad), torch.randn(3, 2, 4, **grad), torch.randn(3, 2, 5, **grad),
          -torch.rand(3, 2).requires_grad_(), torch.rand(3, 2, **grad),
          torch.randn(3, 2, 4, 5, **grad), 0.5)),
        (torch.ops.mom.segment_conv.default,
         (conv_x, torch.randn(4, 3, **grad), torch.randn(4, **grad), torch.tensor([0, 2, 2, 6]),
          torch.randn(3, 2, 4, **grad))),
        (torch.ops.mom.dispatch.default, (idx, torch.rand(2, 3) > 0.2, 4)),
        (torch.ops.mom.combine.default,
         (torch.randn(12, 2, 3, **grad), torch.rand(2, 3, 2, **grad), torch.randperm(12).view(2, 3, 2))),
        (torch.ops.mom.memory_decode.default, (*decode_inputs(dtype=torch.float32), 0.5, False)),
        (torch.ops.mom.memory_decode_.default, (*decode_inputs(dtype=torch.float32), 0.5, False)),
        (torch.ops.mom.combine_backward.default,
         (torch.randn(2, 3, 2, 3), torch.randn(12, 2, 3), torch.rand(2, 3, 2),
          torch.randperm(12).view(2, 3, 2))),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


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
    (lambda: ops.segment_conv(torch.randn(4, 3), torch.randn(2, 4), None, torch.tensor([0, 4])),
     r"weight: expected shape \[3, \*\]"),
    (lambda: ops.gated_delta_step(torch.randn(2, 1, 3), torch.randn(2, 1, 3), torch.randn(2, 1, 3),
                                  torch.rand(2, 1), torch.rand(2, 1), torch.zeros(2, 1, 3, 3,
                                  dtype=torch.float16), 1.0), "state: expected dtype"),
    (lambda: ops.dispatch(torch.zeros(1, 2, 1, dtype=torch.int64), torch.ones(1, 3, dtype=torch.bool), 2),
     r"mask: expected shape \[1, 2\]"),
    (lambda: ops.combine(torch.randn(5, 1, 1), torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64)),
     "o_rows: expected 4 rows"),
    (lambda: ops.memory_decode_(*decode_inputs()[:2], decode_inputs()[2].int(), *decode_inputs()[3:], 1.0),
     "memory_idx: expected dtype"),
    (lambda: ops.memory_decode_(*decode_inputs()[:7], *decode_inputs(slots=7, h=1)[7:], 1.0),
     r"q: expected shape \[3, 4\]"),
    (lambda: ops.memory_decode(*decode_inputs(slots=4)[:2], *decode_inputs(slots=5)[2:], 1.0),
     "per_set: expected at least 5 projection sets"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
