"""GRPO and its variants, as small functions on per-token tensors (B, T) with a completion mask.

GRPO: Shao et al. 2024 (DeepSeekMath). Dr. GRPO: Liu et al. 2025 (no std scaling, a constant token
normaliser). DAPO: Yu et al. 2025 (clip-higher, dynamic sampling, token-level loss, soft overlong
penalty). GSPO: Zheng et al. 2025 (sequence-level importance ratio). The definitions follow TRL 1.16's
GRPOTrainer (`_generate_and_score_completions`, `_compute_loss`) so that on one micro-batch and one
process the per-batch loss is TRL's (tests/test_grpo_losses.py runs TRL's own method on the same tensors).

Aggregation over micro-batches and ranks (the trust issue's rule: an optimizer step is one big batch,
however it is split). Every loss_type is `sum over this micro-batch's tokens of w_i * l_it / normaliser
* world_size`; DDP/ZeRO average gradients over ranks and gradients accumulate over micro-batches, so the
update is that of the whole step as one batch. The normalisers (`StepCounts`) are global:
- grpo:    mean over the step's completions of each completion's token mean (TRL: mean over the
           micro-batch's completions / accumulation steps: the same when micro-batches are equal-sized);
- bnpo:    the step's completion tokens, all micro-batches and ranks (TRL: the micro-batch's own token
           count / accumulation: local; llmlab makes it global, a deliberate difference);
- dr_grpo: completions in the step x max_completion_length (a constant; TRL: the micro-batch's rows);
- dapo:    global by definition: the whole rollout's completion tokens over all ranks / optimizer steps
           per pass over the rollout (TRL: `num_items_in_batch` of the generation batch, gathered over
           processes, x accumulation / steps_per_generation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.checks.stage import GRPO_LOSS_TYPES as LOSS_TYPES
from llmlab.checks.stage import IS_LEVELS, SCALE_REWARDS


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> tuple[Tensor, Tensor]:
    """A_i = (r_i - mean of its group) / (std + 1e-4), as TRL: `rewards` (N,) holds `group_size`
    consecutive completions per prompt. std is Bessel-corrected, per group (`group`) or over the whole
    batch (`batch`); `none` (Dr. GRPO) does not divide. Returns (advantages (N,), std (N,)) where std is
    the group std for `group`/`none` (zero marks a group without signal) and the batch std for `batch`."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards}: one of {SCALE_REWARDS}")
    groups = rewards.view(-1, group_size)  # (prompts, G)
    mean = groups.mean(1).repeat_interleave(group_size)  # (N,)
    if scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = groups.std(1).repeat_interleave(group_size)  # (N,)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, std


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(prompts,) bool: groups whose rewards are all equal (zero advantage: no gradient, DAPO drops them)."""
    groups = rewards.view(-1, group_size)
    return torch.isclose(groups.std(1), torch.zeros(())) if group_size > 1 else torch.ones(len(groups), dtype=torch.bool)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - log pi) - (ref - log pi) - 1 (Schulman 2020, "k3"):
    unbiased for samples of pi, never negative. (B, T) -> (B, T)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def log_importance_weights(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log pi/pi_old per token (B, T), or per sequence as the masked mean of the token log-ratios (GSPO)
    broadcast to (B, T)."""
    log_ratio = logprobs - old_logprobs  # (B, T)
    if level == "token":
        return log_ratio
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        seq = torch.where(mask != 0, log_ratio * m, 0.0).sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        return seq.unsqueeze(-1).expand_as(log_ratio)
    raise ValueError(f"importance_sampling_level={level}: one of {IS_LEVELS}")


def grpo_token_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    epsilon: float = 0.2, epsilon_high: float | None = None, level: str = "token",
                    ref_logprobs: Tensor | None = None, beta: float = 0.0) -> tuple[Tensor, dict]:
    """Per-token loss (B, T): -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_k3.

    `advantages` (B,) is one value per completion; `epsilon_high` None = epsilon (symmetric, GRPO);
    larger = clip-higher (DAPO). Stats (this batch's masked means): `clip_low` (w < 1 - eps with A < 0),
    `clip_high` (w > 1 + eps_high with A > 0), `kl` (k3, when a reference is given), as TRL logs them.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_importance_weights(logprobs, old_logprobs, mask, level))  # (B, T)
    adv = advantages.to(ratio.dtype).unsqueeze(-1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    stats = {}
    valid = mask != 0
    n = valid.sum().clamp(min=1)
    if ref_logprobs is not None and beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        loss = loss + beta * kl
        stats["kl"] = (torch.where(valid, kl, 0.0).sum() / n).detach()
    with torch.no_grad():
        stats["clip_low"] = (((ratio < 1 - epsilon) & (adv < 0) & valid).sum() / n).float()
        stats["clip_high"] = (((ratio > 1 + eps_high) & (adv > 0) & valid).sum() / n).float()
    return torch.where(valid, loss, 0.0), stats


@dataclass
class StepCounts:
    """Normalisers of one optimizer step, over all its micro-batches and all ranks (see the module doc).

    sequences: completions in the step; tokens: their (masked) completion tokens; dapo_tokens: the
    rollout's completion tokens over all ranks / optimizer steps per pass; max_completion_length:
    Dr. GRPO's constant; world_size: ranks whose gradients DDP/ZeRO average."""
    sequences: float
    tokens: float
    dapo_tokens: float
    max_completion_length: int
    world_size: int = 1


def aggregate(per_token_loss: Tensor, mask: Tensor, loss_type: str, counts: StepCounts) -> Tensor:
    """This micro-batch's (this rank's) share of the step loss, to backward as is. On one micro-batch
    and one rank: grpo = mean over rows of the row token means; bnpo = token mean; dr_grpo =
    sum / (rows x max_completion_length); dapo = sum / dapo_tokens (TRL's formulas)."""
    m = mask.to(per_token_loss.dtype)
    masked = torch.where(mask != 0, per_token_loss * m, 0.0)  # (B, T)
    if loss_type == "grpo":
        total, norm = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum(), counts.sequences
    elif loss_type == "bnpo":
        total, norm = masked.sum(), counts.tokens
    elif loss_type == "dr_grpo":
        total, norm = masked.sum(), counts.sequences * counts.max_completion_length
    elif loss_type == "dapo":
        total, norm = masked.sum(), counts.dapo_tokens
    else:
        raise ValueError(f"loss_type={loss_type}: one of {LOSS_TYPES}")
    return total * counts.world_size / max(float(norm), 1.0)


def soft_overlong_penalty(lengths: Tensor, max_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (N,) -> (N,) in [-1, 0]: 0 up to
    max_length - buffer tokens, then falling linearly to -1 at max_length, -1 beyond."""
    start = max_length - buffer
    over = (lengths.float() - start) / max(buffer, 1)
    return torch.where(lengths <= start, 0.0, torch.where(lengths <= max_length, -over, -1.0))
