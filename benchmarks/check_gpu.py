"""GPU check and benchmark of the Triton kernels, in one process (device time is scarce).

1. Every case of tests/test_triton_kernels.py on the GPU vs the float64 CPU reference: a table of
   the worst relative error per op, dtype and output (forward and each gradient).
2. Timings, bf16, the paper's 340M layer (d=1024, H=4, head_dim=256, expand_v=1, M=4, top-2, shared
   memory) at 32K tokens per batch for each T (default 2K, 8K, 32K): forward (under no_grad) and
   forward+backward (gradients of the input and the parameters) of
   - `MomLayer` with the Triton kernels, eager and under torch.compile(fullgraph=True);
   - the same layer with the pure-PyTorch reference kernels (the same ops with their CUDA kernels
     disabled);
   - the reference implementation's layer, flash-linear-attention's `MomAttention` (chunk mode,
     training mode like ours, the same weights so the same routing), when `fla` imports; a shape
     or pass it refuses or crashes on is reported in its cell, and its rows run after all of ours
     so that a CUDA error it leaves behind cannot spoil them;
   - a softmax-attention layer of the same width through SDPA;
   - the floor: max(FLOPs / peak FLOP/s, bytes / peak bandwidth) of the layer's counted work
     (benchmarks/layer_floor.py says what is counted), with the spec-sheet peaks of the card,
     and then measured / floor of the Triton layer (and of fla's);
   plus the chunk scan op alone at the layer's shapes (fla's `chunk_gated_delta_rule` on the same
   rows as its peer, when fla imports), and the peak memory of one forward+backward of each layer
   row (its activations and gradients, above its inputs and weights). With --profile,
   the GPU time per kernel of our layer's forward and forward+backward, eager and compiled, and the
   eager forward's host time per op, at the first T: where eager loses to compiled.
   Each measurement (one forward or one forward+backward of one row) stops after --row-budget
   seconds of wall time after its first warm-up call (at least one timed call), and one predicted,
   from the same row at the previous T (linear in T), to need more than that for a warm-up and one
   timed call is skipped (the PyTorch-reference forward+backward at T=32K); a failing row records its
   error and the run goes on. Memory is freed after every row.

    python benchmarks/check_gpu.py [--no-checks] [--ts 2048 8192 32768] [--tokens 32768]
        [--no-reference] [--no-fla] [--row-budget 30] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from gpu_timing import bench, kernel_table  # noqa: E402
from layer_floor import Card, Floor, Shape, card_peaks, layer_floor  # noqa: E402
from peers import SoftmaxAttention  # noqa: E402
from scan_inputs import scan_inputs  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig, MomLayer  # noqa: E402
from mom_compile.cli_args import check_batch_layouts  # noqa: E402
from mom_compile.ops.table import OPS  # noqa: E402


@contextlib.contextmanager
def reference_kernels():
    """Run the ops' pure-PyTorch reference on CUDA by disabling the CUDA (Triton) kernel of every op
    of the table that has one."""
    with contextlib.ExitStack() as stack:
        for op in OPS:
            if op.triton is not None:
                stack.enter_context(op.definition.set_kernel_enabled("cuda", False))
        yield


def run_checks() -> None:
    from test_triton_kernels import CASES, TOLERANCE, case_id, run_case
    worst: dict[tuple, dict[str, float]] = defaultdict(dict)
    failures = []
    for case in CASES:
        try:
            errors = run_case(case, "cuda")
        except Exception as exc:  # keep going: the table shows every case
            failures.append(f"{case_id(case)}: {type(exc).__name__}: {exc}")
            continue
        key = (case[0], str(case[1]).replace("torch.", ""))
        for name, err in errors.items():
            worst[key][name] = max(worst[key].get(name, 0.0), err)
            if not err <= TOLERANCE[case[1]]:
                failures.append(f"{case_id(case)} {name}: {err:.2e} > {TOLERANCE[case[1]]:.0e}")
    print(f"\n## Kernel vs float64 reference on {torch.cuda.get_device_name()}: worst relative error")
    print("| op | dtype | " + " | ".join(["output", "error"] * 1) + " |")
    print("| --- | --- | --- | --- |")
    for (op, dtype), errs in sorted(worst.items()):
        for name, err in errs.items():
            print(f"| {op} | {dtype} | {name} | {err:.2e} |")
    print(f"{len(CASES)} cases, {len(failures)} failures")
    for line in failures:
        print("  FAIL", line)


class FlaMom(nn.Module):
    """The reference implementation's layer as a peer: fla's `MomAttention.forward(hidden_states,
    attention_mask=None, past_key_values=None, use_cache=False)` returns (o, None, past_key_values,
    router_logits); the peer returns o."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, attention_mask=None, past_key_values=None, use_cache=False)[0]


def fla_peer(layer: MomLayer) -> tuple[nn.Module | None, str]:
    """(fla's MomAttention at our layer's config with our layer's weights, its row name), or (None,
    why not). The arguments are those fla's own MomBlock passes from a MomConfig (mode = attn_mode
    "chunk"; conv_bias is not passed there, i.e. False), spelled out from ours: same parameter names
    and shapes, so our state_dict loads into it and both route every token the same way."""
    name = "reference fla MomAttention"
    try:
        import fla
        from fla.layers.mom import MomAttention
    except Exception as exc:  # optional peer
        return None, f"{name}: not importable ({type(exc).__name__}: {exc})"
    c = layer.config
    try:
        attn = MomAttention(
            hidden_size=c.hidden_size, head_dim=c.head_dim, num_heads=c.num_heads, expand_v=c.expand_v,
            mode="chunk", use_output_gate=c.use_output_gate, use_short_conv=c.use_short_conv,
            conv_size=c.conv_size, conv_bias=c.conv_bias, norm_eps=c.norm_eps, layer_idx=0,
            num_memories=c.num_memories, topk=c.topk, capacity=c.capacity, shared_mem=c.shared_mem,
            single_kv_proj=c.single_kv_proj)
        attn.load_state_dict(layer.state_dict())
        peer = FlaMom(attn).to(next(layer.parameters()).device, next(layer.parameters()).dtype)
    except Exception as exc:
        return None, f"{name}: construction failed ({type(exc).__name__}: {exc})"
    return peer, f"{name} (fla {getattr(fla, '__version__', '?')}, chunk mode)"


def _forward(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def _forward_backward(module: nn.Module, x: torch.Tensor, d_y: torch.Tensor) -> None:
    out = module(x.detach().requires_grad_())
    (out[0] if isinstance(out, tuple) else out).backward(d_y)


def _free() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # a sticky CUDA error must not stop the report
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _error_text(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text.replace("|", "/")[:240]


def _cell(value) -> str:
    if isinstance(value, tuple):
        ms, calls = value
        return f"{ms:.2f}" + (f" ({calls} call{'s' if calls > 1 else ''})" if calls < 3 else "")
    return str(value)


def _peak_gib(fn) -> float:
    """GiB that one call of fn takes at its peak above what is allocated before it: the layer's
    activations and its input's gradient (called after the timed calls, the weights' gradients
    already exist and are not counted)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


class LayerBench:
    """Times rows (forward, forward+backward) under a per-measurement wall-time budget; remembers
    each row's last time to skip a measurement predicted to overrun it."""

    def __init__(self, tokens: int, budget_s: float) -> None:
        self.tokens, self.budget_s = tokens, budget_s
        self.last: dict[tuple[str, str], tuple[int, float]] = {}
        self.rows: list[tuple] = []
        self.memory: list[tuple[int, int, str, float]] = []  # (T, B, row, GiB) of one fwd+bwd

    def inputs(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = max(1, self.tokens // t)
        gen = torch.Generator(device="cuda").manual_seed(t)
        x = torch.randn(b, t, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
        return x, torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen)

    def run(self, t: int, name: str, module: nn.Module | None, x, d_y, ctx=contextlib.nullcontext,
            slow: bool = False, why_not: str = "") -> None:
        b = x.shape[0]
        if module is None:
            cells = [why_not, why_not]
        else:
            cells = []
            fns = [("fwd", functools.partial(_forward, module, x), 3 if slow else 10),
                   ("fwd+bwd", functools.partial(_forward_backward, module, x, d_y), 2 if slow else 10)]
            for kind, fn, iters in fns:
                prev = self.last.get((name, kind))
                predicted_s = None if prev is None else prev[1] * t / prev[0] / 1e3
                if predicted_s is not None and 2 * predicted_s > self.budget_s:
                    cells.append(f"skipped: ~{predicted_s:.0f} s a call predicted from T={prev[0]} "
                                 f"(> budget {self.budget_s:.0f} s for warm-up + 1 call)")
                    continue
                try:
                    with ctx():
                        ms, calls = bench(fn, warmup=1, iters=iters, budget_s=self.budget_s)
                        if kind == "fwd+bwd":
                            self.memory.append((t, b, name, _peak_gib(fn)))
                    self.last[(name, kind)] = (t, ms)
                    cells.append((ms, calls))
                except Exception as exc:  # a refusal or crash is a result: record it, go on
                    cells.append(f"failed: {_error_text(exc)}")
                finally:
                    module.zero_grad(set_to_none=True)
                    _free()
        self.rows.append((t, b, name, *cells))
        said = [f"{_cell(c)} ms" if isinstance(c, tuple) else c for c in cells]
        print(f"  T={t} B={b} {name}: fwd {said[0]}; fwd+bwd {said[1]}", flush=True)


def profile_layer(layer: nn.Module, compiled: nn.Module, x: torch.Tensor, d_y: torch.Tensor) -> None:
    """Kernel tables of the layer, eager and compiled, forward and forward+backward; then the eager
    forward's host time per op (launch-bound or not)."""
    t = x.shape[1]
    for name, module in (("eager", layer), ("compiled", compiled)):
        for kind, call in (("forward", functools.partial(_forward, module, x)),
                           ("forward+backward", functools.partial(_forward_backward, module, x, d_y))):
            print(f"\nGPU time per kernel: {name} layer, one {kind}, T={t}\n" + kernel_table(call, rows=24))
            module.zero_grad(set_to_none=True)
    print(f"\nhost time per op: eager layer, one forward, T={t}\n"
          + kernel_table(functools.partial(_forward, layer, x), rows=24, host=True))


def layer_timings(ts: list[int], tokens: int, with_reference: bool, with_fla: bool, budget_s: float,
                  card: Card, profile: bool = False) -> tuple[list[tuple], dict[int, Floor]]:
    """Layer rows, and the floor of each T on the card's peaks."""
    cfg = MomConfig(hidden_size=1024, num_heads=4, head_dim=256, expand_v=1.0, num_memories=4, topk=2,
                    shared_mem=True, num_hidden_layers=1)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layer = MomLayer(cfg).to(dev, dt)
    # fuses the routing, gathers and norms around the ops; dynamic=False: a static graph per T, as
    # `mom_compile.train` compiles (a graph that a second T makes dynamic runs slower kernels)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    attn = SoftmaxAttention(1024, 4, 256).to(dev, dt)
    floors = {t: layer_floor(Shape.of_config(cfg, t, max(1, tokens // t)), card) for t in ts}
    runner = LayerBench(tokens, budget_s)
    for t in ts:
        x, d_y = runner.inputs(t)
        runner.run(t, "MomLayer, Triton kernels", layer, x, d_y)
        runner.run(t, "MomLayer, Triton kernels, torch.compile", compiled, x, d_y)
        if profile and t == ts[0]:
            profile_layer(layer, compiled, x, d_y)
            _free()
        if with_reference:
            runner.run(t, "MomLayer, PyTorch reference kernels", layer, x, d_y, reference_kernels, slow=True)
        runner.run(t, "softmax attention (SDPA)", attn, x, d_y)
        del x, d_y
        _free()
    if with_fla:  # last: a CUDA error left by the peer cannot spoil our rows
        del attn
        peer, name = fla_peer(layer)
        for t in ts:
            x, d_y = runner.inputs(t)
            runner.run(t, name if peer is not None else "reference fla MomAttention", peer, x, d_y,
                       why_not=name)
            del x, d_y
            _free()
    print("\n| T | B | layer | peak memory of one forward+backward, GiB (above inputs, weights and their "
          "gradients) |")
    print("| --- | --- | --- | --- |")
    for t, b, name, gib in runner.memory:
        print(f"| {t} | {b} | {name} | {gib:.2f} |")
    return runner.rows, floors


SEGMENTS_PER_SEQUENCE = 5  # 4 routed memories and the shared one


def scan_layout(t: int, tokens: int) -> torch.Tensor:
    """Segment offsets of the layer's routed rows at T: B*T*(k+1) rows in B*(M+1) segments (top-2 of
    4 memories, spread evenly, plus the shared one)."""
    b = max(1, tokens // t)
    counts = torch.full((b, SEGMENTS_PER_SEQUENCE), 0, dtype=torch.int64)
    counts[:, :4] = (2 * t) // 4
    counts[:, 4] = t
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.flatten().cumsum(0)]).cuda()


def scan_op_timings(ts: list[int], tokens: int, with_fla: bool) -> list[tuple]:
    """The chunk scan op alone at the layer's routed shapes (`scan_layout`), H=4, K=V=256, bf16: the
    registered chunked kernels (their default tiles, the configuration the checks verify), and the
    per-kernel split of the registered forward+backward (torch profiler) at the first T. Then, as a
    peer on the same rows, fla's `chunk_gated_delta_rule` (varlen), when fla imports."""
    rows = []
    h, dk, dv = 4, 256, 256
    for t in ts:
        offsets = scan_layout(t, tokens)
        q, k, v, g, beta = scan_inputs(offsets, h=h, dk=dk, dv=dv)
        d_o = torch.randn_like(v)
        args = (q, k, v, g, beta, offsets, None, dk ** -0.5)
        variants = [("fwd chunked (registered)", functools.partial(torch.ops.mom.chunk_gated_delta, *args)),
                    ("bwd chunked (registered)",
                     functools.partial(torch.ops.mom.chunk_gated_delta_backward, *args, d_o, None))]
        rows += _time_scan(t, offsets, variants, profile=t == ts[0])
    if with_fla:  # last: a CUDA error left by the peer cannot spoil our rows
        for t in ts:
            offsets = scan_layout(t, tokens)
            rows += _time_scan(t, offsets, fla_scan_variants(offsets), profile=t == ts[0])
    return rows


def _time_scan(t: int, offsets: torch.Tensor, variants: list, profile: bool) -> list[tuple]:
    """Rows (T, B, rows, variant, ms) of the variants that run on `scan_layout`'s offsets, and with
    profile their kernels."""
    rows, ran, n, b = [], [], int(offsets[-1]), (offsets.numel() - 1) // SEGMENTS_PER_SEQUENCE
    for name, fn in variants:
        try:
            ms, _ = bench(fn, iters=10)
        except Exception as exc:  # a config that does not compile, a peer's refusal: report, keep going
            print(f"  scan op T={t} {name}: failed {type(exc).__name__}: {str(exc)[:200]}")
            continue
        rows.append((t, b, n, name, ms))
        ran.append(fn)
        print(f"  scan op T={t} rows {n}: {name}: {ms:.2f} ms", flush=True)
    if profile and ran:
        print(kernel_table(*ran))  # which stage bounds the scan
    return rows


def fla_scan_variants(offsets: torch.Tensor) -> list:
    """fla's `chunk_gated_delta_rule` on the rows of `scan_inputs` (its varlen layout [1, rows, H, K],
    natural-log decays as ours): the forward, and the backward alone (autograd on a kept graph).
    fla refuses its gated `chunk_bwd_dqkwg` under Triton 3.4-3.7.0 on Hopper (wrong results there):
    the backward is also timed with that guard lifted, named so: its time, not its values."""
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as exc:
        print(f"  fla scan peer: not importable ({exc.__class__.__name__})")
        return []
    q, k, v, g, beta = (x.unsqueeze(0).requires_grad_() for x in scan_inputs(offsets))
    d_o = torch.randn_like(v)
    scale = q.shape[-1] ** -0.5

    def forward():
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, cu_seqlens=offsets)[0]

    kept = []  # one forward's graph, kept: each call is a backward alone

    def backward():
        if not kept:
            kept.append(forward())
        torch.autograd.grad(kept[0], (q, k, v, g, beta), d_o, retain_graph=True)

    def backward_unguarded():
        guard = fla_chunk_o.TRITON_ABOVE_3_7_1
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True
        try:
            backward()
        finally:
            fla_chunk_o.TRITON_ABOVE_3_7_1 = guard

    def no_grad_forward():
        with torch.no_grad():
            forward()

    return [("fla fwd chunk_gated_delta_rule", no_grad_forward),
            ("fla bwd chunk_gated_delta_rule", backward),
            ("fla bwd chunk_gated_delta_rule, Hopper guard lifted (time only)", backward_unguarded)]


ROW_ORDER = ["MomLayer, Triton", "MomLayer, PyTorch", "reference fla", "softmax"]


def _rank(row: tuple) -> int:
    return next((i for i, p in enumerate(ROW_ORDER) if row[2].startswith(p)), len(ROW_ORDER))


def _ratio(cell, floor_ms: float) -> str:
    return f"{cell[0] / floor_ms:.1f}" if isinstance(cell, tuple) else "-"


def print_layer_tables(rows: list[tuple], floors: dict[int, Floor], ts: list[int], tokens: int,
                       peaks: str) -> None:
    """The layer table (each T: the rows, then the floor), and measured / floor of the Triton layer
    and of fla's."""
    print(f"\n| T | B | layer | forward ms | forward+backward ms |  (floor peaks: {peaks})")
    print("| --- | --- | --- | --- | --- |")
    for t in ts:
        for _, b, name, f_cell, fb_cell in sorted((r for r in rows if r[0] == t), key=_rank):
            print(f"| {t} | {b} | {name} | {_cell(f_cell)} | {_cell(fb_cell)} |")
        fl = floors[t]
        print(f"| {t} | {max(1, tokens // t)} | floor: max(FLOPs / peak, bytes / bandwidth); fwd "
              f"{fl.fwd_flops / 1e9:.0f} GFLOP {fl.fwd_bytes / 1e9:.2f} GB, fwd+bwd {fl.fb_flops / 1e9:.0f} "
              f"GFLOP {fl.fb_bytes / 1e9:.2f} GB | {fl.fwd_ms:.2f} ({fl.fwd_bound}) | "
              f"{fl.fb_ms:.2f} ({fl.fb_bound}) |")
    print(f"\n## measured / floor of the MoM layers ({peaks})")
    print("| T | B | layer | forward ms | floor | x floor | forward+backward ms | floor | x floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, b, name, f_cell, fb_cell in sorted(rows, key=lambda r: (_rank(r), ts.index(r[0]))):
        if _rank((t, b, name)) in (0, 2):  # ours with the Triton kernels, and the reference's
            fl = floors[t]
            print(f"| {t} | {b} | {name} | {_cell(f_cell)} | {fl.fwd_ms:.2f} | {_ratio(f_cell, fl.fwd_ms)} | "
                  f"{_cell(fb_cell)} | {fl.fb_ms:.2f} | {_ratio(fb_cell, fl.fb_ms)} |")


def sync_free_check() -> None:
    """The registered scan, forward and backward, under torch.cuda.set_sync_debug_mode("error")."""
    from inputs import scan_inputs
    a = scan_inputs("mixed", 2, 64, 64, torch.bfloat16, "cuda", seed=5)
    d_o = torch.randn_like(a["v"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.mom.chunk_gated_delta(**a, scale=0.125)
        torch.ops.mom.chunk_gated_delta_backward(**a, scale=0.125, d_o=d_o, d_final=None)
        print("sync-free: chunk scan fwd+bwd ran under set_sync_debug_mode('error')")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-fla", action="store_true", help="skip the fla MomAttention peer")
    parser.add_argument("--ts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--row-budget", type=float, default=30.0,
                        help="seconds of wall time per layer measurement, after its first warm-up call")
    parser.add_argument("--profile", action="store_true",
                        help="kernel tables of our layer, eager and compiled, at the first T")
    args = parser.parse_args()
    check_batch_layouts(parser, args.tokens, args.ts)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import triton
    device = torch.cuda.get_device_name()
    print(f"card: {device}; torch {torch.__version__}; triton {triton.__version__}; "
          f"commit {tree_commit()}")
    if not args.no_checks:
        t0 = time.perf_counter()
        run_checks()
        sync_free_check()
        print(f"(checks took {time.perf_counter() - t0:.0f} s)")
    if args.no_bench:
        return
    print("\n## timings (bf16, median ms)")
    scan_rows = scan_op_timings(args.ts, args.tokens, not args.no_fla)
    print("\n| T | B | scan rows | chunk scan kernel | ms |")
    print("| --- | --- | --- | --- | --- |")
    for t, b, n, name, ms in scan_rows:
        print(f"| {t} | {b} | {n} | {name} | {ms:.2f} |")
    _free()
    card, peaks = card_peaks(device)
    print(f"\n  floor peaks: {peaks}", flush=True)
    layer_rows, floors = layer_timings(args.ts, args.tokens, not args.no_reference, not args.no_fla,
                                       args.row_budget, card, args.profile)
    print_layer_tables(layer_rows, floors, args.ts, args.tokens, peaks)

if __name__ == "__main__":
    main()
