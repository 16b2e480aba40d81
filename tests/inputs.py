"""Inputs of the op tests, shared by test_ops.py, test_triton_kernels.py and benchmarks/check_gpu.py.

Every builder draws from its own seeded generator in float64 and rounds to the requested dtype, so
a kernel and its float64 reference see the same (rounded) values. Decays, states and routing
weights are in the compute dtype of the inputs (float32, float64 for float64), as the ops require.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mom_compile.ops.precision import compute_dtype

F64 = torch.float64

# (offsets, rows) of packed segments: empty segments, length-1 segments, lengths not a multiple of
# the chunk size (64), rows past offsets[-1], several chunks in one segment, no segment at all.
LAYOUTS = {
    "mixed": ([0, 5, 5, 6, 19, 30], 33),
    "singletons": ([0, 1, 2, 3], 3),
    "all_empty": ([0, 0, 0], 4),
    "long": ([0, 130, 130, 131, 330], 333),
    "no_segments": ([0], 3),
}


def rand(*shape, dtype, device="cpu", gen):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).to(device)


def _uniform(*shape, dtype, device, gen, scale=1.0):
    return (torch.rand(*shape, generator=gen, dtype=F64) * scale).to(dtype).to(device)


def _unit(*shape, dtype, device, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=F64), dim=-1).to(dtype).to(device)


def scan_inputs(layout="mixed", h=2, dk=4, dv=3, dtype=F64, device="cpu", seed=0, with_state=True) -> dict:
    """Keyword arguments of `mom::chunk_gated_delta` (less scale) over LAYOUTS[layout]."""
    gen = torch.Generator().manual_seed(seed)
    offsets, n = LAYOUTS[layout]
    state = compute_dtype(dtype)
    return dict(
        q=_unit(n, h, dk, dtype=dtype, device=device, gen=gen),
        k=_unit(n, h, dk, dtype=dtype, device=device, gen=gen),
        v=rand(n, h, dv, dtype=dtype, device=device, gen=gen),
        g=-_uniform(n, h, dtype=state, device=device, gen=gen, scale=0.3),
        beta=_uniform(n, h, dtype=dtype, device=device, gen=gen),
        offsets=torch.tensor(offsets, device=device),
        initial_state=rand(len(offsets) - 1, h, dk, dv, dtype=state, device=device, gen=gen)
        if with_state else None,
    )


def step_inputs(rows=5, h=2, dk=4, dv=3, dtype=F64, device="cpu", seed=0) -> list:
    """(q, k, v, g, beta, state) of `mom::gated_delta_step`."""
    gen = torch.Generator().manual_seed(seed)
    state = compute_dtype(dtype)
    return [_unit(rows, h, dk, dtype=dtype, device=device, gen=gen),
            _unit(rows, h, dk, dtype=dtype, device=device, gen=gen),
            rand(rows, h, dv, dtype=dtype, device=device, gen=gen),
            -_uniform(rows, h, dtype=state, device=device, gen=gen),
            _uniform(rows, h, dtype=dtype, device=device, gen=gen),
            rand(rows, h, dk, dv, dtype=state, device=device, gen=gen)]


def conv_inputs(layout="mixed", d=5, width=4, dtype=F64, device="cpu", seed=0) -> list:
    """(x, weight, bias, offsets, initial_state) of `mom::segment_conv` over LAYOUTS[layout]."""
    gen = torch.Generator().manual_seed(seed)
    offsets, n = LAYOUTS[layout]
    return [rand(n, d, dtype=dtype, device=device, gen=gen),
            rand(d, width, dtype=dtype, device=device, gen=gen) * 0.5,
            rand(d, dtype=dtype, device=device, gen=gen),
            torch.tensor(offsets, device=device),
            rand(len(offsets) - 1, width - 1, d, dtype=dtype, device=device, gen=gen)]


def decode_inputs(batch=3, h=2, dk=4, dv=3, width=3, slots=5, chosen=2, with_bias=True, single_set=False,
                  dtype=F64, device="cpu", seed=0) -> list:
    """(q, per_set, memory_idx, A_log, dt_bias, conv_weight, conv_bias, conv_states, rec_states) of
    `mom::memory_decode_`: q and the projection sets are strided views of one projection row, as the
    layer passes them; each token chooses `chosen` distinct slots of `slots`, and the last token is
    padding (every choice -1) when there are several."""
    gen = torch.Generator().manual_seed(seed)
    state = compute_dtype(dtype)
    c, set_width = 2 * h * dk + h * dv, h * dk + h * dv + 2 * h
    sets = 1 if single_set else slots
    proj = rand(batch, 3 + h * dk + sets * set_width, dtype=dtype, device=device, gen=gen)
    memory_idx = torch.stack([torch.randperm(slots, generator=gen)[:chosen] for _ in range(batch)])
    if batch > 1:
        memory_idx[-1] = -1
    return [proj[:, 3:3 + h * dk], proj[:, 3 + h * dk:].unflatten(-1, (sets, set_width)),
            memory_idx.to(device), _uniform(h, dtype=dtype, device=device, gen=gen, scale=2.0),
            rand(h, dtype=dtype, device=device, gen=gen),
            rand(c, width, dtype=dtype, device=device, gen=gen) * 0.5,
            rand(c, dtype=dtype, device=device, gen=gen) if with_bias else None,
            rand(batch, slots, width - 1, c, dtype=dtype, device=device, gen=gen),
            rand(batch, slots, h, dk, dv, dtype=state, device=device, gen=gen)]


def combine_inputs(b=2, t=3, k=2, h=2, dv=3, dtype=F64, device="cpu", seed=0) -> list:
    """(o_rows, weights, row_of_choice) of `mom::combine`, the rows in a random permutation."""
    gen = torch.Generator().manual_seed(seed)
    return [rand(b * t * k, h, dv, dtype=dtype, device=device, gen=gen),
            _uniform(b, t, k, dtype=compute_dtype(dtype), device=device, gen=gen),
            torch.randperm(b * t * k, generator=gen).view(b, t, k).to(device)]


def gather_inputs(n=4, sets=3, k=2, a=5, c=7, split=4, single_set=False, dtype=F64, device="cpu",
                  seed=0) -> list:
    """(q, per_set, token, set_of_row, row_of_choice, split) of `mom::gather_rows`: q and the sets
    are strided views of one projection row per token, as the layer passes them; each token's k
    rows lie at random places and read distinct sets (all set 0 when single_set), and one row of
    the first token names a set out of range."""
    gen = torch.Generator().manual_seed(seed)
    proj = rand(n, 2 + a + sets * c, dtype=dtype, device=device, gen=gen)
    chosen = torch.zeros(n, k, dtype=torch.int64) if single_set else \
        torch.stack([torch.randperm(sets, generator=gen)[:k] for _ in range(n)])
    chosen[0, -1] = sets  # placed with the padding: reads zeros
    row_of_choice = torch.randperm(n * k, generator=gen).view(n, k)
    token, set_of_row = torch.empty(n * k, dtype=torch.int64), torch.empty(n * k, dtype=torch.int64)
    token[row_of_choice.flatten()] = torch.arange(n).repeat_interleave(k)
    set_of_row[row_of_choice.flatten()] = chosen.flatten()
    return [proj[:, 2:2 + a], proj[:, 2 + a:].unflatten(-1, (sets, c)),
            *(t.to(device) for t in (token, set_of_row, row_of_choice)), split]


def l2_inputs(n=5, h=3, d=16, strided=True, dtype=F64, device="cpu", seed=0) -> list:
    """(x,) of `mom::l2_normalize`: [n, h, d] rows ([n, d] for h None), a column slice of wider rows
    when strided (as the layer's q and k are of the conv's output)."""
    gen = torch.Generator().manual_seed(seed)
    width = (h or 1) * d
    wide = rand(n, width + 3, dtype=dtype, device=device, gen=gen)
    return [(wide[:, 3:] if strided else wide[:, :width].contiguous()).view(n, *([h] if h else []), d)]


def dispatch_inputs(b=2, t=5, k=2, m=4, device="cpu", seed=0) -> list:
    """(memory_idx, mask, num_memories) of `mom::dispatch`: k distinct memories per token, ~30%
    padding."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(b * t)]).view(b, t, k)
    return [idx.to(device), (torch.rand(b, t, generator=gen) > 0.3).to(device), m]


def route_inputs(lead=(2, 5), m=6, strided=True, nan=True, dtype=F64, device="cpu", seed=0) -> list:
    """(logits,) of `mom::route`: [*lead, m] on a grid of halves (many ties); with nan, the first
    token's all NaN and the second's one NaN (diverged weights); a column slice of wider rows when
    strided, as the layer's logits are of its projection."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randint(-3, 4, (*lead, m + 3), generator=gen).to(dtype) / 2
    flat = wide.view(-1, m + 3)
    if nan:
        flat[0] = float("nan")
        flat[1:2, min(1, m - 1)] = float("nan")
    return [(wide[..., :m] if strided else wide[..., :m].contiguous()).to(device)]


def gated_norm_inputs(lead=(2, 3), h=2, v=5, gate=True, strided=True, choices=None, dtype=F64, device="cpu",
                      seed=0) -> list:
    """(y, z, weight, eps, out dtype, mix) of `mom::gated_rms_norm`: y [*lead, h, v] in the compute
    dtype (the combined memories' output), or [*lead, choices, h, v] with mix [*lead, choices] (a
    decode step's memory outputs and routing weights; else mix is None), z [*lead, h*v] in `dtype`
    (a column slice of wider rows when strided, as the layer's gate is of its projection; None
    without a gate), weight [v]."""
    gen = torch.Generator().manual_seed(seed)
    rows = () if choices is None else (choices,)
    y = rand(*lead, *rows, h, v, dtype=compute_dtype(dtype), device=device, gen=gen)
    wide = rand(*lead, h * v + 3, dtype=dtype, device=device, gen=gen) * 3
    z = (wide[..., 3:] if strided else wide[..., 3:].contiguous()) if gate else None
    weight = 1 + rand(v, dtype=dtype, device=device, gen=gen)
    mix = None if choices is None else \
        rand(*lead, choices, dtype=compute_dtype(dtype), device=device, gen=gen)
    return [y, z, weight, 1e-5, dtype, mix]


def op_inputs(name: str, dtype: torch.dtype) -> list[tuple]:
    """Argument tuples of the op `name` of mom_compile.ops.table.OPS with float inputs in `dtype`,
    small, covering its optional arguments (None and given)."""
    state = compute_dtype(dtype)
    gen = torch.Generator().manual_seed(1)
    if name.startswith("chunk_gated_delta"):
        cases = []
        for with_state in (True, False):
            a = scan_inputs("mixed", dtype=dtype, with_state=with_state)
            args = (*a.values(), 0.5)
            if name.endswith("_backward"):
                d_final = rand(*a["initial_state"].shape, dtype=state, gen=gen) if with_state else None
                args += (rand(*a["v"].shape, dtype=dtype, gen=gen), d_final)
            cases.append(args)
        if name.endswith("_backward"):  # with the training forward's residuals
            cases.append(cases[0] + torch.ops.mom.chunk_gated_delta_train(*cases[0][:8])[2:])
        return cases
    if name == "gated_delta_step":
        return [(*step_inputs(dtype=dtype), 0.5)]
    if name == "segment_conv":
        return [tuple(conv_inputs(dtype=dtype))]
    if name == "segment_conv_backward":
        x, *rest = conv_inputs(dtype=dtype)
        return [(rand(*x.shape, dtype=dtype, gen=gen), rand(*rest[-1].shape, dtype=dtype, gen=gen), x, *rest)]
    if name == "dispatch":
        idx, mask, m = dispatch_inputs()
        out_of_range = idx.clone()
        out_of_range[0, 1, 0], out_of_range[1, 3, 1] = -1, m  # placed with the padding
        return [(idx, mask, m), (out_of_range, mask, m)]
    if name == "gather_rows":
        return [tuple(gather_inputs(dtype=dtype, single_set=single)) for single in (False, True)]
    if name == "gather_rows_backward":
        cases = []
        for single in (False, True):
            q, per_set, *rows, split = gather_inputs(dtype=dtype, single_set=single)
            r, c = rows[0].shape[0], per_set.shape[2]
            d_head = rand(r, q.shape[1] + split, dtype=dtype, gen=gen)
            d_tail = rand(r, c - split, dtype=dtype, gen=gen)
            cases.append((d_head, d_tail, *rows, per_set.shape[1], split))
        return cases
    if name == "l2_normalize":
        return [tuple(l2_inputs(dtype=dtype, strided=strided)) for strided in (True, False)]
    if name == "l2_normalize_backward":
        x, = l2_inputs(dtype=dtype)
        y, r = torch.ops.mom.l2_normalize(x)
        return [(rand(*x.shape, dtype=dtype, gen=gen), y, r)]
    if name == "combine":
        return [tuple(combine_inputs(dtype=dtype))]
    if name == "combine_backward":
        return [(rand(2, 3, 2, 3, dtype=state, gen=gen), *combine_inputs(dtype=dtype))]
    if name in ("memory_decode", "memory_decode_"):
        return [(*decode_inputs(dtype=dtype, with_bias=bias, single_set=single), 0.5, single)
                for bias, single in ((True, False), (False, True))]
    if name == "gated_rms_norm":
        return [tuple(gated_norm_inputs(dtype=dtype)), tuple(gated_norm_inputs(gate=False, dtype=dtype)),
                tuple(gated_norm_inputs(choices=3, dtype=dtype))]
    if name == "route":
        # no NaN here: opcheck compares outputs without equal_nan
        return [(*route_inputs(nan=False, dtype=dtype), 3, True),
                (*route_inputs(strided=False, nan=False, dtype=dtype), 1, False)]
    raise KeyError(f"no inputs for op {name!r}: add them here")


def on_meta(args: tuple) -> tuple:
    """args with every tensor moved to the meta device, where the ops run their fake kernels."""
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
