"""Training losses (docs/math.md#block-model-and-loss): next-token cross-entropy and the router
load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.precision import upcast
from ..ops.route import top_k

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] (labels are shifted here, as in
    Hugging Face models); positions labelled -100 are ignored."""
    shifted = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(upcast(logits.flatten(0, 1)), shifted.flatten(), ignore_index=IGNORE_INDEX)


def load_balancing_loss(
    router_logits: list[torch.Tensor], topk: int, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss over all layers' router logits [B, T, M] together:
    aux = M * sum_{i<k, e<M} f[i, e] * P[e], f[i, e] the share of tokens whose i-th choice is e,
    P[e] the mean router probability of e; padding tokens (mask False) are left out. The choices
    are the router's (`route`'s ranking: ties to the lower index), not torch.topk's."""
    logits = upcast(torch.stack(router_logits))
    probs = logits.softmax(-1)
    num_memories = probs.shape[-1]
    chosen = F.one_hot(top_k(logits, topk), num_memories).to(probs.dtype)
    if mask is None:
        mask = torch.ones(probs.shape[1:3], dtype=torch.bool, device=probs.device)
    w = mask.to(probs.dtype).expand(probs.shape[:3])
    share = (chosen * w[..., None, None]).sum((0, 1, 2)) / w.sum()
    mean_prob = (probs * w[..., None]).sum((0, 1, 2)) / w.sum()
    return num_memories * (share * mean_prob).sum()
