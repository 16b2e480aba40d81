"""Softmax-attention peers of the MoM layer and model, for same-run comparisons on the GPU: the same
width, heads, MLP and vocabulary, with causal attention through scaled_dot_product_attention."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom_compile import MomConfig


class SoftmaxAttention(nn.Module):
    """A causal softmax-attention layer of the MoM layer's width: q/k/v/o projections + SDPA."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.mlp_size
        self.n1, self.n2 = nn.RMSNorm(d, eps=config.norm_eps), nn.RMSNorm(d, eps=config.norm_eps)
        self.attn = SoftmaxAttention(d, config.num_heads, config.head_dim)
        self.gate_up = nn.Linear(d, 2 * i, bias=False)
        self.down = nn.Linear(i, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.n1(h))
        gate, up = self.gate_up(self.n2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class TransformerLM(nn.Module):
    """The MoM model's Transformer twin: embeddings, pre-norm blocks (SDPA attention of the same
    heads and head size, the same SwiGLU MLP), final norm and an untied head. forward(ids, labels)
    returns the next-token cross-entropy, as MomForCausalLM(...).loss does."""

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
