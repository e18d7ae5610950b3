"""Pairwise reward-model loss (Bradley-Terry preference model).

InstructGPT (Ouyang et al. 2022, eq. 1): loss = -log sigmoid(r(x, y_c) - r(x, y_r)).
Llama 2 (Touvron et al. 2023, eq. 2) subtracts a margin m(r) that grows with how strongly the
annotator preferred y_c, pushing clearly-better answers further apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PairwiseRewardLoss(nn.Module):
    """mean(-logsigmoid(r_chosen - r_rejected - margin)); logsigmoid keeps huge gaps finite."""

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = margin

    def forward(self, r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
        # r_chosen, r_rejected, margin: (B,). A per-pair margin replaces the constant one.
        margin = self.margin if margin is None else margin
        return -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin).mean()


@torch.no_grad()
def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly (ties count as wrong)."""
    return (r_chosen > r_rejected).float().mean()
