"""What one layer keeps for its backward: the tensors saved between forward and backward, per token.

The paper's 340M MoM layer (also with its scan states recomputed in the backward, the
"scan_states" checkpointing scope) against the softmax-attention layer of the same width
(`peers.py`), bf16, on any device (the CPU by default: what is saved depends on the autograd
formulas and the partitioner, not on the kernels):
  eager     every tensor autograd saves (saved-tensor hooks), counted once per storage, parameters
            left out;
  compiled  the extra outputs of the forward graph that torch.compile's partitioner hands to the
            backward (min-cut rematerialisation, what Inductor uses), parameters left out.
Peak memory adds the backward's transient buffers to these; `check_gpu.py` measures it on a GPU.

    python benchmarks/saved_activations.py [--tokens 1024] [--seq 512] [--top 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from peers import SoftmaxAttention  # noqa: E402
from tree_commit import tree_commit  # noqa: E402

from mom_compile import MomConfig, MomLayer  # noqa: E402

Saved = list[tuple[str, tuple, torch.dtype, int]]  # name, shape, dtype, bytes


def eager_saved(layer: torch.nn.Module, x: torch.Tensor) -> Saved:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen, rows = set(), []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            made_by = type(t.grad_fn).__name__ if t.grad_fn is not None else "input"
            rows.append((made_by, tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return rows


def compiled_saved(layer: torch.nn.Module, x: torch.Tensor) -> Saved:
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    rows = []

    param_kinds = {(tuple(p.shape), p.dtype) for p in layer.parameters()}

    def forward_graph(gm, _inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in outputs[1:]:  # after the layer's output: what the backward receives
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            if node.op == "placeholder" and (tuple(value.shape), value.dtype) in param_kinds:
                continue  # a parameter, kept anyway (the layer input x does count)
            rows.append((node.name, tuple(value.shape), value.dtype, value.numel() * value.element_size()))
        return gm

    backend = aot_autograd(fw_compiler=forward_graph, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(x)
    return rows


class FirstOutput(torch.nn.Module):
    """The MoM layer without its router logits output, so both layers return one tensor."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch (default 1024)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--top", type=int, default=8, help="largest saved tensors listed per row (default 8)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.tokens % args.seq:
        p.error(f"--tokens: expected a multiple of --seq ({args.seq}), got {args.tokens}")
    torch.manual_seed(0)
    config = MomConfig.preset("340m")
    recomputing = MomLayer(config)
    recomputing.keep_scan_states = False  # gradient_checkpointing_enable("scan_states")
    layers = {
        "MoM layer (M=4, top-2 + shared)": FirstOutput(MomLayer(config)),
        "MoM layer, scan states recomputed": FirstOutput(recomputing),
        "softmax attention (SDPA)": SoftmaxAttention(config.hidden_size, config.num_heads, config.head_dim),
    }
    x = torch.randn(args.tokens // args.seq, args.seq, config.hidden_size, dtype=torch.bfloat16,
                    device=args.device, requires_grad=True)
    print(f"torch {torch.__version__}, {args.device}, commit {tree_commit()}; 340m layer width, bf16, "
          f"{args.tokens} tokens ({x.shape[0]} x {args.seq})")
    print("| layer | mode | saved for backward, KiB/token | largest saved tensors (KiB/token) |")
    print("| --- | --- | --- | --- |")
    for name, layer in layers.items():
        layer = layer.to(args.device, torch.bfloat16)
        for mode, count in (("eager", eager_saved), ("compiled", compiled_saved)):
            rows = count(layer, x)
            per_token = sum(r[3] for r in rows) / args.tokens / 1024
            largest = sorted(rows, key=lambda r: -r[3])[:args.top]
            listing = "; ".join(f"{r[0]} {list(r[1])} {str(r[2])[6:]} {r[3] / args.tokens / 1024:.1f}"
                                for r in largest)
            print(f"| {name} | {mode} | {per_token:.1f} | {listing} |", flush=True)


if __name__ == "__main__":
    main()
