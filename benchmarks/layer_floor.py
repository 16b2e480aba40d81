"""A counted lower bound ("floor") on the time of one MoM layer, forward and forward+backward.

Pure Python (no torch, no GPU): `python benchmarks/layer_floor.py [--ts 2048 8192 32768]
[--tokens 32768]` prints the floor of the paper's 340M layer (d=1024, H=4, K=V=256, M=4, top-2 +
shared memory, conv 4, chunk 64, bf16) on an H100 SXM and an H200; check_gpu.py imports it to put
the measured times next to it.

floor = max(FLOPs / peak_flops, bytes / peak_bandwidth), from spec-sheet peaks (dense bf16 tensor
cores; HBM): it is the time of the layer's counted work on a card that ran every product at its
peak and moved every counted byte at its peak bandwidth, with no launch, latency or pipeline loss.

What is counted. N = B*T tokens; every token is routed to topk memories plus the shared one, so
R = N*(topk+1) "rows"; the routing is taken as even: each sequence has M segments of T*topk/M rows
and one shared segment of T rows, cut into chunks of C=64 (n_c = chunks in all). A matrix product
[m, k] x [k, n] is 2*m*k*n FLOPs. The layer is five stages; each stage reads its inputs and its
weights once and writes its outputs once (bf16, 2 bytes, unless said), i.e. every tensor that
crosses a stage boundary is written once and read once, nothing inside a stage touches memory:
  A. input projections, on every token: gate [d -> M], q_proj [d -> HK], g_proj [d -> HV]; on every
     row (its memory's set, or the shared one): k [d -> HK], v [d -> HV], beta [d -> H],
     alpha [d -> H]. Only the k+1 sets a token is routed to are counted (3 of the 5 sets); with
     --all-sets every set on every token, as the layer is built (one stacked projection).
     Bytes: x once, all weights once, out q, z (per token), k, v, beta/alpha pre-activations (per
     row), the router logits (fp32) and per row an int32 token index and an fp32 weight.
  B. short conv (width W, per segment) + SiLU + L2 norm of q, k: 2W FLOPs per element for the conv,
     ~8 per element for the elementwise work. Bytes: q (gathered per row from the per-token q),
     k, v in; q, k, v out, all per row.
  C. chunked gated-delta scan (WY form, per chunk of C rows and per head, K x V state):
       A = beta K K^T (decayed)          2 C^2 K
       T = (I + A)^-1, triangular        C^3 / 3
       W = T beta e^G K, U = T beta V    2 C^2 K + 2 C^2 V
       Vn = U - W S0                     2 C K V    (sequential state pass)
       S1 = e^g S0 + K^T Vn              2 C K V    (sequential state pass)
       O = Q S0 + (Q K^T * decay) Vn     2 C K V + 2 C^2 K + 2 C^2 V
     (gates, cumsums and decays are O(C^2) elementwise and not counted). Bytes: q, k, v and the
     beta/alpha pre-activations in (the gate activations fused in), o out, and each chunk's start
     state S0 [H, K, V] written once by the sequential pass and read once by the output pass (the
     two-pass chunked form; fla and our kernels both materialise them in bf16). At K=V=256 and
     C=64 a chunk's state (65536 numbers per head) outweighs its q/k/v (49152), so these states are
     the largest single byte item. W, U, Vn are taken as kept on chip (not counted).
  D. combine the k+1 memory outputs with the routing weights, per-head RMSNorm, times SiLU(z):
     ~2 FLOPs per row element + ~9 per token element. Bytes: o rows, weights, z in; one [N, HV] out.
  E. o_proj [HV -> d]. Bytes: [N, HV] in, weight, y [N, d] out.
Backward (assumption): every product costs 2x its forward FLOPs (one product for each operand's
gradient), elementwise work 2x as well; plus the recompute of the scan's backward: A, T, W, U and
the sequential state pass (Vn and S), as fla's kernels and ours with `keep_scan_states=False` do.
The layer's default keeps S0 and Vn from the forward and skips that state pass (~4% of the counted
forward+backward FLOPs at the 340M shapes), so for it this floor counts slightly too much.
Bytes of a stage's backward: its saved inputs and weights read again, the
gradient of its outputs read, the gradients of its inputs and weights written (so 2x inputs +
2x weights + 1x outputs); the scan adds its chunk start states recomputed (written + read) and
their gradients (written + read); stage B adds the sum of the per-row dq back onto tokens.
Parameter gradients are taken as bf16. Not counted: the dispatch (sort) of rows into segments, the
optimizer, kernel launches.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from tree_commit import tree_commit

from mom_compile.cli_args import check_batch_layouts


@dataclass(frozen=True)
class Card:
    name: str
    flops: float      # dense bf16 tensor-core FLOP/s (spec sheet, no sparsity)
    bandwidth: float  # HBM bytes/s (spec sheet)

    def describe(self) -> str:
        return f"{self.name}: {self.flops / 1e12:.0f} TFLOP/s dense bf16, {self.bandwidth / 1e12:.2f} TB/s"


CARDS = {
    "H100 SXM": Card("H100 SXM", 989e12, 3.35e12),
    "H200": Card("H200", 989e12, 4.8e12),
}


def card_for(device_name: str) -> tuple[Card, bool]:
    """(peaks, recognised) for a torch.cuda.get_device_name() string; an unrecognised card gets the
    H100 SXM peaks and recognised=False."""
    name = device_name.upper()
    if "H200" in name and "NVL" not in name and "GH200" not in name:  # the SXM card's peaks
        return CARDS["H200"], True
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return CARDS["H100 SXM"], True
    return CARDS["H100 SXM"], False


def card_peaks(device_name: str) -> tuple[Card, str]:
    """(peaks, their description) for a device name; the description says when the card was not
    recognised and the H100 SXM's peaks stand in."""
    card, known = card_for(device_name)
    return card, card.describe() + ("" if known else f"; {device_name} not recognised, H100 SXM peaks used")


@dataclass(frozen=True)
class Shape:
    """The layer's sizes (defaults: the paper's 340M layer) and the run's batch."""
    t: int
    batch: int
    hidden: int = 1024
    heads: int = 4
    head_dim: int = 256
    head_v_dim: int = 256
    memories: int = 4
    topk: int = 2
    shared_mem: bool = True
    conv: int = 4
    chunk: int = 64
    elem: int = 2  # bytes of an activation / weight element (bf16)
    all_sets: bool = False  # stage A projects every memory's set for every token, not only the routed

    @classmethod
    def of_config(cls, config, t: int, batch: int) -> Shape:
        """From a mom_compile MomConfig (read by attribute, no import)."""
        return cls(t, batch, config.hidden_size, config.num_heads, config.head_dim, config.head_v_dim,
                   config.num_memories, config.topk, config.shared_mem, config.conv_size)


@dataclass(frozen=True)
class Stage:
    name: str
    fwd_flops: float
    fwd_bytes: float
    bwd_flops: float
    bwd_bytes: float


def chunk_flops(c: int, k: int, v: int) -> tuple[float, float]:
    """(forward FLOPs, FLOPs the backward recomputes) of one chunk of c rows, one head."""
    kkt = 2 * c * c * k
    solve = c ** 3 / 3
    wu = 2 * c * c * k + 2 * c * c * v
    state_pass = 2 * (2 * c * k * v)
    output = 2 * c * k * v + 2 * c * c * k + 2 * c * c * v
    return kkt + solve + wu + state_pass + output, kkt + solve + wu + state_pass


def _segment_rows(s: Shape) -> list[int]:
    """Rows of each segment of one sequence under even routing."""
    routed = s.t * s.topk
    rows = [routed // s.memories + (m < routed % s.memories) for m in range(s.memories)]
    return rows + ([s.t] if s.shared_mem else [])


def layer_stages(s: Shape) -> list[Stage]:
    e, d, h, hk, hv = s.elem, s.hidden, s.heads, s.heads * s.head_dim, s.heads * s.head_v_dim
    n = s.batch * s.t
    sets_per_token = s.topk + int(s.shared_mem)
    r = n * sets_per_token
    n_chunks = s.batch * sum(math.ceil(rows / s.chunk) for rows in _segment_rows(s))
    set_width = hk + hv + 2 * h

    def stage(name, flops, inputs, weights, outputs, bwd_extra_flops=0.0, bwd_extra_bytes=0.0,
              fwd_extra_bytes=0.0):
        return Stage(name, flops, inputs + weights + outputs + fwd_extra_bytes,
                     2 * flops + bwd_extra_flops,
                     2 * inputs + 2 * weights + outputs + bwd_extra_bytes)

    # A. input projections, on the routed rows (or, all_sets, every set of every token)
    slots = s.memories + int(s.shared_mem)
    projected = n * slots if s.all_sets else r
    a_flops = 2 * n * d * (s.memories + hk + hv) + 2 * projected * d * set_width
    a_weights = (d * (s.memories + hk + hv) + slots * set_width * d) * e
    a_out = n * s.memories * 4 + n * (hk + hv) * e + projected * set_width * e + r * 8
    a_sets = f"all {slots} sets" if s.all_sets else f"{sets_per_token} of {slots} sets"
    # B. short conv + silu + l2 norm (per row); backward also sums the per-row dq onto tokens
    b_elems = r * (2 * hk + hv)
    b_flops = b_elems * (2 * s.conv + 8)
    b_in = b_elems * e
    b_w = (2 * hk + hv) * s.conv * e
    b_reduce = r * hk * e + n * hk * e
    # C. chunked scan
    c_fwd, c_recompute = chunk_flops(s.chunk, s.head_dim, s.head_v_dim)
    c_flops = n_chunks * h * c_fwd
    c_in = b_elems * e + r * 2 * h * e
    c_out = r * hv * e
    states = n_chunks * h * s.head_dim * s.head_v_dim * e  # one write (or one read) of the start states
    # D. combine + norm + gate
    d_flops = 2 * r * hv + 9 * n * hv
    d_in = r * hv * e + r * 4 + n * hv * e
    # E. o_proj
    e_flops = 2 * n * hv * d
    return [
        stage(f"A input projections ({a_sets} of k/v/b/a per token)", a_flops, n * d * e, a_weights, a_out),
        stage("B short conv + SiLU + L2 norm", b_flops, b_in, b_w, b_elems * e, bwd_extra_bytes=b_reduce),
        stage(f"C chunked scan ({n_chunks} chunks x {h} heads)", c_flops, c_in, 0, c_out,
              bwd_extra_flops=n_chunks * h * c_recompute, bwd_extra_bytes=4 * states,
              fwd_extra_bytes=2 * states),
        stage("D combine + RMSNorm + gate", d_flops, d_in, hv * e, n * hv * e),
        stage("E o_proj", e_flops, n * hv * e, hv * d * e, n * d * e),
    ]


@dataclass(frozen=True)
class Floor:
    fwd_flops: float
    fwd_bytes: float
    fb_flops: float   # forward + backward
    fb_bytes: float
    fwd_ms: float
    fb_ms: float
    fwd_bound: str    # "compute" or "memory"
    fb_bound: str


def _time(flops: float, nbytes: float, card: Card) -> tuple[float, str]:
    compute, memory = flops / card.flops, nbytes / card.bandwidth
    return 1e3 * max(compute, memory), "compute" if compute >= memory else "memory"


def layer_floor(s: Shape, card: Card) -> Floor:
    stages = layer_stages(s)
    ff = sum(x.fwd_flops for x in stages)
    fb_ = sum(x.fwd_bytes for x in stages)
    bf = sum(x.bwd_flops for x in stages)
    bb = sum(x.bwd_bytes for x in stages)
    fwd_ms, fwd_bound = _time(ff, fb_, card)
    fb_ms, fb_bound = _time(ff + bf, fb_ + bb, card)
    return Floor(ff, fb_, ff + bf, fb_ + bb, fwd_ms, fb_ms, fwd_bound, fb_bound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--all-sets", action="store_true",
                        help="count every memory's input projection on every token, as the layer is built, "
                             "not only the sets a token is routed to")
    args = parser.parse_args()
    check_batch_layouts(parser, args.tokens, args.ts)
    shapes = [Shape(t, max(1, args.tokens // t), all_sets=args.all_sets) for t in args.ts]
    s0 = shapes[0]
    print(f"## Floor of the MoM layer (d={s0.hidden}, H={s0.heads}, K={s0.head_dim}, V={s0.head_v_dim}, "
          f"M={s0.memories}, top-{s0.topk}{' + shared' if s0.shared_mem else ''}, conv {s0.conv}, "
          f"chunk {s0.chunk}, bf16), {args.tokens} tokens per batch; commit {tree_commit()}")
    print(f"\n### Counted work per stage at T={s0.t}, B={s0.batch}")
    print("| stage | fwd GFLOP | fwd GB | bwd GFLOP | bwd GB |")
    print("| --- | --- | --- | --- | --- |")
    for st in layer_stages(s0):
        print(f"| {st.name} | {st.fwd_flops / 1e9:.1f} | {st.fwd_bytes / 1e9:.3f} | "
              f"{st.bwd_flops / 1e9:.1f} | {st.bwd_bytes / 1e9:.3f} |")
    for card in CARDS.values():
        print(f"\n### {card.describe()}")
        print("| T | B | fwd GFLOP | fwd GB | fwd floor ms | fwd+bwd GFLOP | fwd+bwd GB | fwd+bwd floor ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for s in shapes:
            f = layer_floor(s, card)
            print(f"| {s.t} | {s.batch} | {f.fwd_flops / 1e9:.0f} | {f.fwd_bytes / 1e9:.2f} | "
                  f"{f.fwd_ms:.3f} ({f.fwd_bound}) | {f.fb_flops / 1e9:.0f} | {f.fb_bytes / 1e9:.2f} | "
                  f"{f.fb_ms:.3f} ({f.fb_bound}) |")


if __name__ == "__main__":
    main()
