"""KTO (Ethayarajh et al. 2024, eq. 7 as TRL 1.16's KTOTrainer implements it) on unpaired examples.

Each example is a (prompt, completion) with a boolean label: desirable (True) or undesirable (False).
With r = log pi(y|x) - log ref(y|x) (summed log-probs of the completion) and the reference point
z0 = KL(pi || ref), estimated on the same batch from *mismatched* pairs (prompt i with the completion
of example i-1), detached and clamped at 0:

    desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
    undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))

and the loss is the mean over the examples of the batch. The implicit reward is beta * r (as DPO's).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class KTOOutput(NamedTuple):
    losses: Tensor  # (B,) weighted per-example losses (the batch loss is their mean)
    rewards: Tensor  # (B,) beta * (log pi - log ref), detached
    kl: Tensor  # scalar: the reference point z0, detached, >= 0


def kl_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z0: mean over the batch of log pi - log ref on the mismatched pairs, (B,) x 2 -> scalar; detached and
    clamped at 0 (a KL is >= 0; the batch estimate can be negative). TRL averages it over ranks too;
    llmlab uses each micro-batch's own estimate."""
    return (policy_kl_logps.float() - ref_kl_logps.float()).mean().detach().clamp(min=0)


class KTOLoss(nn.Module):
    average_logps = False  # summed log-probs of each completion (TRL's convention)
    needs_reference = True
    unpaired = True  # the stage feeds labelled single examples, not pairs

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__()
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, policy_kl_logps: Tensor,
                ref_kl_logps: Tensor) -> KTOOutput:
        """policy_logps, ref_logps: (B,) of the examples; labels: (B,) bool; *_kl_logps: (B,) of the
        mismatched pairs (no gradient needed)."""
        kl = kl_reference_point(policy_kl_logps, ref_kl_logps)
        r = policy_logps.float() - ref_logps.float()  # (B,)
        desirable = 1 - torch.sigmoid(self.beta * (r - kl))
        undesirable = 1 - torch.sigmoid(self.beta * (kl - r))
        losses = torch.where(labels, self.desirable_weight * desirable, self.undesirable_weight * undesirable)
        return KTOOutput(losses, (self.beta * r).detach(), kl)
