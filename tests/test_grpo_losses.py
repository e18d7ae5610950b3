"""GRPO maths (llmlab/losses/grpo.py) against values worked out by hand, and the per-batch loss of each
loss_type against TRL 1.16's own `GRPOTrainer._compute_loss` run on the same tensors."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmlab.losses.grpo import (StepCounts, aggregate, group_advantages, grpo_token_loss, k3_kl,
                                log_importance_weights, soft_overlong_penalty, zero_variance_groups)

t = torch.tensor


def test_group_advantages_by_hand():
    rewards = t([1.0, 0.0, 0.0, 1.0,   # group 1: mean 0.5, unbiased std sqrt(1/3)
                 1.0, 1.0, 1.0, 1.0])  # group 2: no variance -> advantage 0
    adv, std = group_advantages(rewards, 4, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, t([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(std[:4], torch.full((4,), math.sqrt(1 / 3)))
    adv, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: centred, not scaled
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # batch: the group mean, the std of all 8 (mean 0.75; squared deviations 6 x 0.0625 + 2 x 0.5625 = 1.5)
    adv, std = group_advantages(rewards, 4, "batch")
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    torch.testing.assert_close(adv, t([b, -b, -b, b, 0, 0, 0, 0]))
    assert zero_variance_groups(rewards, 4).tolist() == [False, True]


def test_each_loss_type_aggregates_by_hand():
    """Ratio 1 (on-policy): per-token loss = -A. Row 0: A = 1 on 2 tokens, row 1: A = -3 on 1 token."""
    lp = t([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = t([[1, 1, 0], [1, 0, 0]]).bool()
    per_token, stats = grpo_token_loss(lp, lp.detach(), t([1.0, -3.0]), mask)
    torch.testing.assert_close(per_token, t([[-1.0, -1.0, 0.0], [3.0, 0.0, 0.0]]))
    counts = StepCounts(sequences=2, tokens=3, dapo_tokens=6, max_completion_length=3)
    expected = {"grpo": (-1 + 3) / 2,     # mean over rows of the row token means
                "bnpo": (-2 + 3) / 3,     # token mean
                "dr_grpo": 1 / (2 * 3),   # sum / (rows x max_completion_length)
                "dapo": 1 / 6}            # sum / the rollout's tokens per optimizer step
    for loss_type, value in expected.items():
        assert float(aggregate(per_token, mask, loss_type, counts)) == pytest.approx(value), loss_type
    assert float(stats["clip_low"]) == float(stats["clip_high"]) == 0.0


def test_step_global_normalisers_make_micro_batches_and_ranks_one_batch():
    """Two micro-batches (or two ranks, whose gradients DDP averages) of unequal token counts sum (average)
    to the whole batch's loss for every loss_type."""
    torch.manual_seed(0)
    lp, old = torch.randn(4, 5), torch.randn(4, 5)
    adv = torch.randn(4)
    mask = t([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()
    per_token, _ = grpo_token_loss(lp, old, adv, mask, 0.2, 0.28)
    whole = StepCounts(sequences=4, tokens=int(mask.sum()), dapo_tokens=int(mask.sum()), max_completion_length=5)
    ranks = StepCounts(**{**whole.__dict__, "world_size": 2})
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        one = aggregate(per_token, mask, loss_type, whole)
        micro = sum(aggregate(per_token[i:i + 2], mask[i:i + 2], loss_type, whole) for i in (0, 2))
        two_ranks = sum(aggregate(per_token[i:i + 2], mask[i:i + 2], loss_type, ranks) for i in (0, 2)) / 2
        torch.testing.assert_close(micro, one)
        torch.testing.assert_close(two_ranks, one)


def test_clip_higher_by_hand():
    """epsilon 0.2 below, 0.28 above: ratios 1.5 and 0.5 with advantages +1 and -1."""
    old = torch.zeros(1, 4)
    lp = torch.log(t([[1.5, 0.5, 0.5, 1.5]]))
    adv_rows = t([1.0, -1.0, 1.0, -1.0])  # one token per row: reshape to 4 rows
    per_token, stats = grpo_token_loss(lp.view(4, 1), old.view(4, 1), adv_rows, torch.ones(4, 1, dtype=torch.bool),
                                       epsilon=0.2, epsilon_high=0.28)
    # A>0, r=1.5: -min(1.5, 1.28) (clipped high); A<0, r=0.5: -min(-0.5, -0.8) = 0.8 (clipped low);
    # A>0, r=0.5: -min(0.5, 0.8) = -0.5; A<0, r=1.5: -min(-1.5, -1.28) = 1.5 (never clipped: pessimistic)
    torch.testing.assert_close(per_token.view(-1), t([-1.28, 0.8, -0.5, 1.5]))
    assert float(stats["clip_high"]) == 0.25 and float(stats["clip_low"]) == 0.25
    symmetric, _ = grpo_token_loss(lp.view(4, 1), old.view(4, 1), adv_rows, torch.ones(4, 1, dtype=torch.bool),
                                   epsilon=0.2)
    assert float(symmetric[0, 0]) == pytest.approx(-1.2)


def test_sequence_level_importance_ratio_by_hand():
    """GSPO: one ratio per sequence, exp of the masked mean token log-ratio (padding ignored)."""
    lp = t([[math.log(2.0), 0.0, 5.0]])
    mask = t([[1, 1, 0]]).bool()
    w = log_importance_weights(lp, torch.zeros(1, 3), mask, "sequence").exp()
    torch.testing.assert_close(w, torch.full((1, 3), math.sqrt(2.0)))
    per_token, _ = grpo_token_loss(lp, torch.zeros(1, 3), t([1.0]), mask, 0.5, 0.5, level="sequence")
    torch.testing.assert_close(per_token, t([[-math.sqrt(2.0), -math.sqrt(2.0), 0.0]]))


def test_k3_kl_estimator_by_hand():
    """pi = 0.5, ref = 0.25: exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.6931 - 1; zero where they agree."""
    kl = k3_kl(torch.log(t([0.5, 0.3])), torch.log(t([0.25, 0.3])))
    torch.testing.assert_close(kl, t([0.5 + math.log(2) - 1, 0.0]))
    lp = torch.log(t([[0.5]]))
    per_token, stats = grpo_token_loss(lp, lp, t([0.0]), torch.ones(1, 1, dtype=torch.bool),
                                       ref_logprobs=torch.log(t([[0.25]])), beta=0.1)
    assert float(per_token) == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    assert float(stats["kl"]) == pytest.approx(0.5 + math.log(2) - 1, rel=1e-5)


def test_soft_overlong_penalty_by_hand():
    """max 10, buffer 4: no penalty up to 6 tokens, -1/4 per token after, -1 at and beyond 10."""
    got = soft_overlong_penalty(t([3, 6, 7, 8, 10, 12]), 10, 4)
    torch.testing.assert_close(got, t([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))


# ---------------------------------------------------------------------------------- TRL equality
def trl_loss(loss_type, logps, old, ref, adv, mask, beta, eps, eps_high, level, max_len, num_items):
    """TRL 1.16's `GRPOTrainer._compute_loss`, run unchanged on given per-token log-probs (its model forward
    is replaced by a function returning them; one process, no accumulation)."""
    from trl import GRPOTrainer

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x))
    B, T = logps.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    return GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["train"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_equals_trl_compute_loss(loss_type, level):
    torch.manual_seed(1)
    B, T = 6, 5
    mask = torch.rand(B, T).argsort(1) < torch.randint(1, T + 1, (B, 1))  # random lengths ...
    mask = torch.arange(T).expand(B, T) < mask.sum(1, keepdim=True)     # ... as prefixes
    old = -torch.rand(B, T) * 3
    logps = (old + 0.3 * torch.randn(B, T)).requires_grad_()  # ratios around 1, some clipped
    ref = old + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)
    beta, eps, eps_high = 0.04, 0.2, 0.28
    want, metrics = trl_loss(loss_type, logps, old, ref, adv, mask, beta, eps, eps_high, level, T, int(mask.sum()))
    per_token, stats = grpo_token_loss(logps, old, adv, mask, eps, eps_high, level, ref, beta)
    counts = StepCounts(sequences=B, tokens=int(mask.sum()), dapo_tokens=int(mask.sum()), max_completion_length=T)
    got = aggregate(per_token, mask, loss_type, counts)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got, logps)
    g_want, = torch.autograd.grad(want, logps)
    torch.testing.assert_close(g_got, g_want)
    if level == "token":  # TRL counts sequence-level clips once per sequence, llmlab per token
        assert float(stats["clip_low"]) == pytest.approx(metrics["clip_ratio/low_mean"][0])
        assert float(stats["clip_high"]) == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert float(stats["kl"]) == pytest.approx(metrics["kl"][0], rel=1e-5)
