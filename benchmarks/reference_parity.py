"""Parity with the reference implementation (flash-linear-attention's `mom` model), on a GPU.

The same random weights are loaded into the reference MomForCausalLM and into ours (through a
checkpoint folder the reference writes with save_pretrained), and their logits are compared in
float32: at T >= 70 (the reference's chunk path), with left padding, and on tiny prefills with
B*T*k <= 32, where the reference's unstable sort loses time order (docs/math.md#correctness). Our
float64 CPU run is the arbiter where the two disagree.

    python benchmarks/reference_parity.py     # needs CUDA and the flash-linear-attention package
"""
from __future__ import annotations

import sys
import tempfile

import torch
from tree_commit import tree_commit

from mom_compile import MomForCausalLM


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> int:
    try:
        from fla.models import MomConfig as RefConfig
        from fla.models import MomForCausalLM as RefModel
    except ImportError as e:
        print(f"reference implementation not importable: {e}")
        return 2
    torch.manual_seed(0)
    ref_config = RefConfig(hidden_size=256, num_hidden_layers=2, num_heads=2, head_dim=64, expand_v=1.0,
                           num_memories=4, topk=2, shared_mem=True, vocab_size=1000, hidden_ratio=3,
                           fuse_cross_entropy=False)
    ref = RefModel(ref_config).cuda().float().eval()
    with torch.no_grad():  # the reference initialises norms to one and conv biases off: move them
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder, safe_serialization=True)
        ours = MomForCausalLM.from_pretrained(folder, dtype=torch.float32, device="cuda")
        oracle = MomForCausalLM.from_pretrained(folder, dtype=torch.float64, device="cpu")

    print("models loaded", flush=True)
    rows = []

    def compare(name: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            kw = {} if mask is None else {"attention_mask": mask.cuda()}
            r = ref(input_ids=ids.cuda(), use_cache=False, **kw).logits.float()
            o = ours(ids.cuda(), **kw).logits
            kw64 = {} if mask is None else {"attention_mask": mask}
            truth = oracle(ids, **kw64).logits
        keep = slice(None) if mask is None else mask.bool()
        rows.append((name, list(ids.shape), rel_err(o.cpu()[keep], truth[keep]),
                     rel_err(r.cpu()[keep], truth[keep]), rel_err(o.cpu()[keep], r.cpu()[keep])))
        print(*rows[-1], flush=True)

    vocab = ref_config.vocab_size
    compare("chunk path T=70", torch.randint(0, vocab, (2, 70)))
    compare("chunk path T=256", torch.randint(0, vocab, (2, 256)))
    mask = torch.ones(3, 96, dtype=torch.int64)
    mask[0, :17] = 0
    mask[2, :60] = 0
    compare("left padding T=96", torch.randint(0, vocab, (3, 96)), mask)
    for t in (3, 5, 8):
        compare(f"tiny prefill B*T*k={2 * t * 2}", torch.randint(0, vocab, (2, t)))

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  commit {tree_commit()}")
    print(f"{'case':28} {'shape':10} {'ours vs f64':>12} {'ref vs f64':>12} {'ours vs ref':>12}")
    for name, shape, a, b, c in rows:
        print(f"{name:28} {str(shape):10} {a:12.2e} {b:12.2e} {c:12.2e}")
    worst_ours = max(r[2] for r in rows)
    print(f"worst relative error of ours vs float64: {worst_ours:.2e}")
    return 0 if worst_ours < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
