"""Direct preference optimisation losses on sequence log-probs (see ``lm.sequence_logprobs``).

Both take h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), the implicit reward
margin, and differ only in what they do with it; pick one with Hydra ``_target_``. A loss's
``average_logps`` attribute says which log-probs the stage must feed it: per-sequence sums (False) or
means per response token (True).
"""
from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn


class DPOOutput(NamedTuple):
    loss: Tensor  # scalar
    chosen_rewards: Tensor  # (B,) beta * (log pi - log ref), detached: log these and their margin
    rejected_rewards: Tensor  # (B,)


def _margin_and_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    chosen = policy_chosen.float() - ref_chosen.float()  # (B,)
    rejected = policy_rejected.float() - ref_rejected.float()  # (B,)
    return chosen - rejected, (beta * chosen).detach(), (beta * rejected).detach()


class DPOLoss(nn.Module):
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h).

    With ``label_smoothing`` = eps > 0 this is conservative DPO (cDPO, Mitchell 2023), which
    assumes a fraction eps of the preference labels are flipped:
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """

    average_logps = False  # summed log-probs of each answer

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> DPOOutput:
        h, chosen_rewards, rejected_rewards = _margin_and_rewards(
            self.beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)  # (B,)
        return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards)


class IPOLoss(nn.Module):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm..."): (h - 1/(2 beta))^2.

    A squared loss regresses the margin to a finite target instead of pushing it to infinity, so
    the policy cannot drift arbitrarily far from the reference on deterministic preferences.

    ``length_normalized`` (default): h is built from each answer's mean log-prob per response token,
    TRL's convention (confirmed by the IPO authors to TRL; the paper's results use it), so the
    squared margin does not grow with answer length and beta means the same for short and long
    answers. ``length_normalized=false`` is the summed form (log-probs summed over the answer).
    """

    def __init__(self, beta: float = 0.1, length_normalized: bool = True):
        super().__init__()
        self.beta, self.length_normalized = beta, length_normalized

    @property
    def average_logps(self) -> bool:
        """The stage feeds mean per-token log-probs when length-normalised, sums otherwise."""
        return self.length_normalized

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> DPOOutput:
        h, chosen_rewards, rejected_rewards = _margin_and_rewards(
            self.beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        return DPOOutput(((h - 1 / (2 * self.beta)) ** 2).mean(), chosen_rewards, rejected_rewards)
