"""Metrics on generated text (torchmetrics, so they accumulate over batches and reduce across ranks)."""
from __future__ import annotations

import torch
from torchmetrics import Metric


def normalize_answer(text: str) -> str:
    """What exact match compares: the text with surrounding whitespace removed."""
    return text.strip()


class ExactMatch(Metric):
    """Fraction of predictions equal to their reference after `normalize_answer` (0.0 when empty)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"ExactMatch: {len(preds)} predictions for {len(targets)} references")
        self.correct += sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
