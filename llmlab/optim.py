"""Optimizer parameter groups and learning-rate schedules (warmup + cosine / linear / constant)."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms and 1-D params get no weight decay (as GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Multiplier of the base lr at a step: linear warmup to 1, then decay to min_lr_ratio."""
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif name == "linear":
            shape = 1 - progress
        else:  # constant
            shape = 1.0
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return schedule


def warmup_schedule(optimizer, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0):
    if name not in ("cosine", "linear", "constant"):
        raise ValueError(f"stage.scheduler.name={name!r}: use cosine, linear or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps, min_lr_ratio))
