"""PPO pieces for RLHF, all on per-token tensors (B, T) with a response mask.

PPO clipped objective: Schulman et al. 2017. GAE: Schulman et al. 2016. KL-penalised reward and the
adaptive KL coefficient: Ziegler et al. 2019 (as used in InstructGPT). The mask is 1 on the response
tokens of each row (a contiguous prefix) and 0 on padding after it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is set (0 when the mask is empty). Masked-out entries
    are dropped with ``where``, so non-finite padding cannot turn the mean into NaN."""
    mask = mask.to(x.dtype)
    x = torch.where(mask != 0, x * mask, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp_min(1e-8)
    return x.sum(dim) / mask.sum(dim).clamp_min(1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries (Bessel-corrected if ``unbiased`` and there are >1 of them)."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * torch.where(n > 1, n / (n - 1), 1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to unit variance over the masked entries (and zero mean if ``shift_mean``)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), run backwards over tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A taken as 0 after the last valid token, so padding cannot leak into the response.
    Returns (advantages, returns = advantages + values), both (B, T) and without gradient: they are
    targets. Advantages are 0 on padding.
    """
    valid = mask != 0  # (B, T)
    r, v = torch.where(valid, rewards, 0.0), torch.where(valid, values, 0.0)  # padding -> 0
    B, T = rewards.shape
    advantages = torch.zeros_like(v)  # (B, T)
    next_value = next_adv = v.new_zeros(B)  # (B,)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        next_adv = torch.where(valid[:, t], delta + gamma * lam * next_adv, 0.0)
        next_value = v[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def masked_token_sum_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None = None) -> Tensor:
    """Sum of x over the masked tokens / n_tokens; the masked mean when n_tokens is None.

    Under DDP/ZeRO the ranks' gradients are averaged, so each rank passes n_tokens = the mini-batch's
    global token count / world size (PPOModule.token_normalizer): the update is then the token mean of
    the whole global mini-batch, not a mean of per-rank means. One rank: n_tokens = mask.sum()."""
    if n_tokens is None:
        return masked_mean(x, mask)
    mask = mask.to(x.dtype)
    total = torch.where(mask != 0, x * mask, 0.0).sum()
    return total / torch.as_tensor(n_tokens, dtype=x.dtype, device=x.device).clamp_min(1e-8)


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float = 0.2, n_tokens: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: max(-A r, -A clip(r, 1-c, 1+c)).

    Returns (loss, clip_fraction, approx_kl); the loss is a token sum / `n_tokens` (the masked mean
    when None, see `masked_token_sum_mean`), the two statistics are this batch's masked means.
    approx_kl uses the k3 estimator (r - 1) - log r of KL(old || new) (Schulman, "Approximating KL
    Divergence", 2020): unbiased and never negative.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_token_sum_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip_range_value: float = 0.2, n_tokens: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), as in
    OpenAI baselines' PPO2: the value head may not move further than c from its rollout estimate.
    Returns (loss, value_clip_fraction); the loss over tokens as in `ppo_policy_loss`."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)  # (B, T)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_token_sum_mean(torch.maximum(unclipped_err, clipped_err), mask, n_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clip_fraction


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2): nudges beta so the observed KL tracks
    ``target``; the error is clipped to +-20% and scaled by n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def leave_one_out_centered(score: Tensor, group_size: int) -> Tensor:
    """Each score minus the mean score of the other responses to the same prompt: the leave-one-out
    baseline of RLOO (Kool et al. 2019; Ahmadian et al. 2024), unbiased because it does not depend on
    the response it is subtracted from. ``score`` (B,) holds ``group_size`` consecutive responses per
    prompt; returns (B,)."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 responses per prompt")
    groups = score.view(-1, group_size)  # (prompts, k)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (prompts, k)
    return (groups - others).view(-1)


def kl_penalized_rewards(score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward (Ziegler et al. 2019): -kl_coef * (log pi - log ref) on every response
    token, plus the reward model's sequence ``score`` (B,) on the last valid token of each row.
    Returns (rewards, kl), both (B, T) and 0 on padding."""
    kl = torch.where(mask != 0, logprobs - ref_logprobs, 0.0)  # (B, T)
    rewards = -kl_coef * kl
    n_valid = mask.sum(-1).long()  # (B,)
    last = (n_valid - 1).clamp_min(0)  # (B,) index of the last response token
    bonus = score.to(rewards.dtype) * (n_valid > 0)  # (B,) rows with no response get no score
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl
