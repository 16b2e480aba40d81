"""AdamW with decoupled weight decay on the weight matrices only, and its learning-rate schedule:
linear warm-up to the peak, then cosine decay to min_lr_ratio * peak at the last step."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    ) -> torch.optim.AdamW:
    """Matrices, embeddings and conv kernels decay; norms, A_log and dt_bias (vectors) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """The factor of the peak learning rate used by optimizer step `step` (0-based)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    factor = warmup_cosine(warmup_steps, total_steps, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                   lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
    """The run's peak lr, weight decay and betas over those of an optimizer and scheduler loaded from
    a checkpoint, from the next step on: on --resume, values given anew apply (the saved ones are
    set again, exactly, when none are)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, decay, factor in zip(optimizer.param_groups, (weight_decay, 0.0), scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), betas=tuple(betas),
                     weight_decay=decay)
