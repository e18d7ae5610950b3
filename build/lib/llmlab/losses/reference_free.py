"""Reference-free preference losses: no frozen reference model is built for them (``needs_reference``).

Both take the policy's *length-normalised* log-probs of the chosen and rejected answers, (B,) each:
the mean log-prob per answer token (``average_logps = True``; the stage computes it with
``lm.sequence_logprobs(average=True)``), as TRL 1.16's ORPOTrainer and CPOTrainer(loss_type="simpo") do.
They return a ``DPOOutput`` whose rewards are each loss's own implicit reward, detached, so the stage
logs reward accuracy and margin as it does for DPO.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.losses.dpo import DPOOutput


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012): log1p(-exp(x)) far
    below 0, log(-expm1(x)) near it. A mean log-prob is < 0 (x = 0 gives -inf: probability 1)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with log p the mean per-token log-prob of an answer, (B,) -> (B,)."""
    return mean_logps - log1mexp(mean_logps)


class ORPOLoss(nn.Module):
    """The odds-ratio term of ORPO (Hong et al. 2024, eq. 7): -beta * log sigmoid(log odds(y_c) - log odds(y_r)),
    with odds(y) = p / (1 - p) and p = exp(mean log-prob per answer token).

    ORPO's full objective is NLL(chosen) + this (beta is the paper's lambda): the NLL is the stage's
    `sft_weight` term (conf/stage/orpo.yaml sets it to 1), the token mean over the chosen answers.
    Implicit reward (logged, accuracy): beta * log odds(y), so the margin is beta x the log odds ratio.
    """

    average_logps = True  # odds of the per-token (geometric mean) probability
    needs_reference = False

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> DPOOutput:
        chosen, rejected = log_odds(policy_chosen_logps.float()), log_odds(policy_rejected_logps.float())  # (B,)
        losses = -self.beta * F.logsigmoid(chosen - rejected)  # (B,)
        return DPOOutput(losses.mean(), (self.beta * chosen).detach(), (self.beta * rejected).detach())


class SimPOLoss(nn.Module):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (mean logp(y_c) - mean logp(y_r)) - gamma).

    The reward beta * mean log-prob per answer token needs no reference and does not grow with answer
    length; gamma is the target reward margin. ``label_smoothing`` = eps as in cDPO:
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z). Implicit reward (logged, accuracy): beta * mean log-prob.
    """

    average_logps = True
    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> DPOOutput:
        chosen = self.beta * policy_chosen_logps.float()  # (B,) rewards
        rejected = self.beta * policy_rejected_logps.float()
        z = chosen - rejected - self.gamma  # (B,)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return DPOOutput(losses.mean(), chosen.detach(), rejected.detach())
