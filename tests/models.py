"""Small models shared by the tests."""
from __future__ import annotations

import torch

from mom_compile import MomConfig, MomForCausalLM

TINY_VOCAB = 97


def tiny_config(**overrides) -> MomConfig:
    """A model small enough for float64 oracles and CPU compilation."""
    values = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8,
                  num_memories=4, topk=2, conv_size=4, hidden_ratio=2)
    values.update(overrides)
    return MomConfig(**values)


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> MomForCausalLM:
    torch.manual_seed(seed)
    model = MomForCausalLM(tiny_config(**overrides)).to(dtype)
    perturb_(model)
    return model.eval()


def ids(b: int, t: int) -> torch.Tensor:
    """Random token ids [b, t] of the tiny model's vocabulary."""
    return torch.randint(0, TINY_VOCAB, (b, t))


@torch.no_grad()
def perturb_(model) -> None:
    """Make every weight matter: norm weights off 1 and conv biases non-zero (strong decays have
    their own test in test_layer.py)."""
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "conv_bias")):
            p.add_(0.3 * torch.randn_like(p))
