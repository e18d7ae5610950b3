"""Hand-worked values for every loss in llmlab.losses (fast, CPU)."""
import math

import pytest
import torch

from llmlab.losses import (
    IGNORE_INDEX, AdaptiveKLController, DPOLoss, FixedKLController, IPOLoss, PairwiseRewardLoss,
    causal_lm_loss, causal_lm_loss_sum, entropy_from_logits, gae_advantages, kl_penalized_rewards,
    masked_mean, masked_var, masked_whiten, pairwise_accuracy, ppo_policy_loss, ppo_value_loss,
    sequence_logprobs, token_logprobs,
)

t = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


# ---------------------------------------------------------------- lm: on a tiny real GPT-2
@pytest.fixture(scope="module")
def tiny_batch():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    input_ids = torch.randint(0, 64, (3, 10))  # (B, T)
    labels = input_ids.clone()
    labels[1, :4] = IGNORE_INDEX  # prompt masked
    labels[2, :2] = IGNORE_INDEX  # prompt masked ...
    labels[2, 7:] = IGNORE_INDEX  # ... and right padding
    with torch.no_grad():
        hf_loss = model(input_ids=input_ids, labels=labels).loss
        logits = model(input_ids=input_ids).logits  # (B, T, V)
    return logits, labels, hf_loss


def loop_logprobs(logits, labels):
    """Reference: one position at a time, straight from the definition."""
    out = []
    for b in range(labels.size(0)):
        total, n = 0.0, 0
        for i in range(1, labels.size(1)):
            if labels[b, i] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, i - 1].double(), -1)[labels[b, i]].item()
                n += 1
        out.append((total, n))
    return out


def test_causal_lm_loss_matches_hf(tiny_batch):
    logits, labels, hf_loss = tiny_batch
    close(causal_lm_loss(logits, labels), hf_loss, 1e-5)


def test_causal_lm_loss_sum_is_token_weighted(tiny_batch):
    logits, labels, _ = tiny_batch
    loss_sum, n = causal_lm_loss_sum(logits, labels)
    assert n.item() == 9 + 6 + 5  # targets: labels[:, 1:] not ignored (positions 1-9, 4-9, 2-6)
    close(loss_sum / n, causal_lm_loss(logits, labels))
    # micro-batches: summing sums and counts gives the full-batch mean exactly (not a mean of means)
    s1, n1 = causal_lm_loss_sum(logits[:1], labels[:1])
    s2, n2 = causal_lm_loss_sum(logits[1:], labels[1:])
    close((s1 + s2) / (n1 + n2), causal_lm_loss(logits, labels), 1e-5)


def test_causal_lm_loss_all_ignored_is_zero_not_nan():
    assert causal_lm_loss(torch.randn(1, 4, 8), torch.full((1, 4), IGNORE_INDEX)).item() == 0.0


def test_sequence_logprobs_matches_loop(tiny_batch):
    logits, labels, _ = tiny_batch
    ref = loop_logprobs(logits, labels)
    close(sequence_logprobs(logits, labels), [s for s, _ in ref], 1e-4)
    close(sequence_logprobs(logits, labels, average=True), [s / n for s, n in ref], 1e-5)


def test_sequence_logprobs_low_precision_path_matches_fp32(tiny_batch):
    logits, labels, _ = tiny_batch
    half = logits.bfloat16()  # bf16 goes through the row-by-row fp32 upcast
    close(sequence_logprobs(half, labels), sequence_logprobs(half.float(), labels), 1e-4)


def test_token_logprobs_shape_and_values(tiny_batch):
    logits, labels, _ = tiny_batch
    ids = labels.clamp_min(0)
    lp = token_logprobs(logits, ids)
    assert lp.shape == (3, 9)
    close(lp, torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1), 1e-5)


def test_entropy_from_logits():
    # uniform over V=8 -> log 8 = 2.0794415; one-hot-ish (-inf elsewhere) -> 0, not NaN
    logits = torch.stack([torch.zeros(8), t([0.0] + [-float("inf")] * 7)])[None]  # (1, 2, 8)
    close(entropy_from_logits(logits), [[math.log(8), 0.0]])
    x = torch.randn(2, 3, 5)
    p = x.softmax(-1)
    close(entropy_from_logits(x), -(p * p.log()).sum(-1), 1e-5)


def test_lm_huge_logits_are_finite():
    logits = torch.randn(2, 6, 16) * 1e4
    labels = torch.randint(0, 16, (2, 6))
    for value in (causal_lm_loss(logits, labels), sequence_logprobs(logits, labels), entropy_from_logits(logits)):
        assert torch.isfinite(value).all()


# ---------------------------------------------------------------- reward model
def test_pairwise_reward_loss_hand_values():
    # r_c=2, r_r=0: -log sigmoid(2) = log(1 + e^-2) = 0.126928
    close(PairwiseRewardLoss()(t([2.0]), t([0.0])), 0.1269280)
    # constant margin 1: log(1 + e^-1) = 0.313262
    close(PairwiseRewardLoss(margin=1.0)(t([2.0]), t([0.0])), 0.3132617)
    # per-pair margins [0, 2] on gaps [2, 2]: (log(1+e^-2) + log 2) / 2 = (0.126928 + 0.693147) / 2 = 0.410038
    close(PairwiseRewardLoss()(t([2.0, 2.0]), t([0.0, 0.0]), margin=t([0.0, 2.0])), 0.4100376)


def test_pairwise_accuracy():
    close(pairwise_accuracy(t([1.0, 0.0, 3.0, 2.0]), t([0.0, 1.0, 3.0, 1.0])), 0.5)  # tie counts as wrong


# ---------------------------------------------------------------- DPO / IPO
def test_dpo_policy_equals_reference_is_log2():
    logps = t([-3.0, -7.5])
    out = DPOLoss(beta=0.1)(logps, logps - 1, logps, logps - 1)
    close(out.loss, math.log(2))  # h = 0: -log sigmoid(0) = log 2
    close(out.chosen_rewards, [0.0, 0.0])
    close(out.rejected_rewards, [0.0, 0.0])


def test_dpo_hand_value_beta_half():
    # pi_c=-1, pi_r=-3, ref_c=ref_r=-2: chosen log-ratio 1, rejected -1, h = 2, beta*h = 1
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards = 0.5 * (+1, -1)
    out = DPOLoss(beta=0.5)(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    close(out.loss, 0.3132617)
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [-0.5])
    assert not out.chosen_rewards.requires_grad


def test_dpo_label_smoothing_hand_value():
    # cDPO, eps=0.1, beta*h = 1: 0.9 * log(1+e^-1) + 0.1 * log(1+e^1)
    #   = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    out = DPOLoss(beta=0.5, label_smoothing=0.1)(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))
    close(out.loss, 0.4132617)


def test_ipo_hand_value():
    # beta=0.5 -> target margin 1/(2*0.5) = 1; h = [2, 4]: ((2-1)^2 + (4-1)^2) / 2 = 5
    out = IPOLoss(beta=0.5)(t([-1.0, 0.0]), t([-3.0, -4.0]), t([-2.0, 0.0]), t([-2.0, 0.0]))
    close(out.loss, 5.0)
    close(out.chosen_rewards, [0.5, 0.0])
    close(out.rejected_rewards, [-0.5, -2.0])


def test_ipo_length_normalized_by_default_hand_value():
    # IPO takes each answer's mean log-prob per response token (TRL's convention; the stage feeds
    # sequence_logprobs(average=loss.average_logps)). Vocab 2, logits = log-probs. Chosen: 2 response
    # tokens, policy p=0.8 each, reference 0.5: mean ratio log 1.6. Rejected: 1 token, policy 0.2,
    # reference 0.5: ratio log 0.4. h = log 1.6 - log 0.4 = log 4; beta=0.5 -> (log 4 - 1)^2 = 0.1492233.
    # Summed form: h = 2 log 1.6 - log 0.4 = 1.8562980 -> 0.8562980^2 = 0.7332462.
    lp = lambda p: [math.log(p), math.log(1 - p)]  # noqa: E731  logits whose log-softmax is themselves
    labels = t([[-100, 0, 0], [-100, 0, -100]])  # (2, 3): chosen row, rejected row; targets are token 0
    policy = t([[lp(0.8), lp(0.8), lp(0.5)], [lp(0.2), lp(0.5), lp(0.5)]])  # (2, 3, 2): logits[:, t] scores t+1
    ref = t([[lp(0.5)] * 3, [lp(0.5)] * 3])
    for loss_fn, want in ((IPOLoss(beta=0.5), 0.1492233), (IPOLoss(beta=0.5, length_normalized=False), 0.7332462)):
        pol = sequence_logprobs(policy, labels, average=loss_fn.average_logps)  # (2,)
        rf = sequence_logprobs(ref, labels, average=loss_fn.average_logps)
        close(loss_fn(pol[:1], pol[1:], rf[:1], rf[1:]).loss, want)
    assert IPOLoss().average_logps and not DPOLoss().average_logps


@pytest.mark.parametrize("loss_fn", [DPOLoss(beta=0.1), DPOLoss(beta=0.1, label_smoothing=0.2), IPOLoss(beta=0.1)])
def test_preference_losses_nan_safe_for_huge_values(loss_fn):
    pc = t([-1e6, 0.0, -1e9], requires_grad=True)
    pr = t([0.0, -1e6, 1e9], requires_grad=True)
    out = loss_fn(pc, pr, t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_pairwise_nan_safe_for_huge_values():
    rc, rr = t([-1e30, 1e30], requires_grad=True), t([1e30, -1e30], requires_grad=True)
    loss = PairwiseRewardLoss()(rc, rr)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rc.grad).all()


# ---------------------------------------------------------------- PPO
def test_masked_stats():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)  # ((-1)^2 + 0 + 1^2) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2 / 3)
    close(masked_whiten(x, mask)[:3], [-1.0, 0.0, 1.0], 1e-5)
    close(masked_whiten(x, mask, shift_mean=False)[:3], [1.0, 2.0, 3.0], 1e-5)  # (x - 2) / 1 + 2
    close(masked_mean(t([[1.0, 3.0], [5.0, float("inf")]]), t([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])


def test_gae_hand_values():
    # gamma=0.9, lam=0.8 (gamma*lam = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.3], V after the end = 0
    #   t=2: delta = 1 + 0       - 0.3 =  0.70;  A2 = 0.70
    #   t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13;  A1 = -0.13 + 0.72*0.70  = 0.374
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;  A0 = -0.14 + 0.72*0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]
    adv, ret = gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.70]])
    close(ret, [[0.62928, 0.774, 1.0]])


def test_gae_padding_does_not_leak():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]])
    ref_adv, _ = gae_advantages(rewards, values, t([[1, 1, 1]]), gamma=0.9, lam=0.8)
    # the same row twice, each padded with garbage (inf included) after its end
    garbage = t([[7.0, -3.0], [float("inf"), 5.0]])
    padded_rewards = torch.cat([rewards.repeat(2, 1), garbage], 1)  # (2, 5)
    padded_values = torch.cat([values.repeat(2, 1), garbage], 1)  # (2, 5)
    adv, ret = gae_advantages(padded_rewards, padded_values, t([[1, 1, 1, 0, 0]] * 2), gamma=0.9, lam=0.8)
    close(adv[:, :3], ref_adv.repeat(2, 1))
    close(adv[:, 3:], torch.zeros(2, 2))
    close(ret[:, :3], ref_adv.repeat(2, 1) + values)


def test_ppo_policy_loss_hand_values():
    # clip 0.2; loss per token = max(-A r, -A clip(r, 0.8, 1.2))
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2  clipped
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8  clipped
    #   r=1.1, A=+2: max(-2.2, -2.2) = -2.2
    #   5th token masked out (r=100, A=5)
    # loss = (-1.2 - 0.5 + 0.8 - 2.2) / 4 = -0.775; clip fraction 2/4
    # approx_kl (k3 = r - 1 - log r): 1.5 -> 0.0945349, 0.5 -> 0.1931472 (x2), 1.1 -> 0.0046898; mean 0.1213798
    ratio = t([[1.5, 0.5, 0.5, 1.1, 100.0]])
    old = t([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logprobs = (old + ratio.log()).requires_grad_()
    loss, clip_frac, kl = ppo_policy_loss(logprobs, old, t([[1.0, 1.0, -1.0, 2.0, 5.0]]), t([[1, 1, 1, 1, 0]]))
    close(loss, -0.775)
    close(clip_frac, 0.5)
    close(kl, 0.1213798)
    loss.backward()  # clipped tokens get no gradient; unclipped ones get -A r / 4
    close(logprobs.grad, [[0.0, -0.125, 0.0, -0.55, 0.0]])


def test_ppo_token_losses_are_one_big_batch_over_ranks():
    # two "ranks" with 1 and 4 response tokens: each divides its token sum by global count / world
    # (= 5 / 2); the mean of the two (what DDP does to gradients) is the loss of the whole mini-batch.
    # One rank with n_tokens = mask.sum() is the plain masked mean (unchanged numbers).
    lp, old, adv = t([[0.1, 0.0, 0.3, -0.2]] * 2), t([[0.0, 0.1, 0.1, 0.0]] * 2), t([[1.0, -2.0, 0.5, 3.0]] * 2)
    mask = t([[1, 0, 0, 0], [1, 1, 1, 1]])
    whole = ppo_policy_loss(lp, old, adv, mask)[0]
    close(ppo_policy_loss(lp, old, adv, mask, n_tokens=mask.sum())[0], whole)
    ranks = [ppo_policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], n_tokens=5 / 2)[0] for i in (0, 1)]
    close((ranks[0] + ranks[1]) / 2, whole)
    per_rank_means = [ppo_policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0] for i in (0, 1)]
    assert abs(float((per_rank_means[0] + per_rank_means[1]) / 2 - whole)) > 0.1  # the old, unweighted mean
    values, returns = t([[1.0, 2.0, 0.0, 0.5]] * 2), torch.zeros(2, 4)
    whole_v = ppo_value_loss(values, values, returns, mask)[0]
    ranks_v = [ppo_value_loss(values[i:i + 1], values[i:i + 1], returns[i:i + 1], mask[i:i + 1], n_tokens=2.5)[0]
               for i in (0, 1)]
    close((ranks_v[0] + ranks_v[1]) / 2, whole_v)


def test_ppo_value_loss_hand_values():
    # clip 0.2, returns 0
    #   v=1.0, old=0.5: clipped v = 0.7 -> max(1.00, 0.49) = 1.00
    #   v=0.0, old=0.1: within range   -> max(0, 0)       = 0
    #   v=0.0, old=1.0: clipped v = 0.8 -> max(0, 0.64)    = 0.64  clipped
    # loss = 0.5 * (1 + 0 + 0.64) / 3 = 0.2733333; clip fraction 1/3
    loss, frac = ppo_value_loss(t([[1.0, 0.0, 0.0, 9.0]]), t([[0.5, 0.1, 1.0, 0.0]]), torch.zeros(1, 4),
                                t([[1, 1, 1, 0]]))
    close(loss, 0.2733333)
    close(frac, 1 / 3)


def test_adaptive_kl_controller():
    # target 6, horizon 10000, 256 steps
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # 9/6 - 1 = 0.5 -> clipped 0.2; mult 1 + 0.2*256/1e4 = 1.00512
    close(ctl.value, 0.2 * 1.00512)
    ctl.update(current_kl=6.6, n_steps=256)  # 6.6/6 - 1 = 0.1 (unclipped); mult 1.00256
    close(ctl.value, 0.2 * 1.00512 * 1.00256)
    ctl.update(current_kl=0.0, n_steps=256)  # -1 -> clipped -0.2; mult 0.99488
    close(ctl.value, 0.2 * 1.00512 * 1.00256 * 0.99488)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_kl_penalized_rewards_hand_values():
    # kl_coef 0.1; row 0 has 3 valid tokens, row 1 has 1
    #   kl row 0 = [-1+1.5, -2+2, -3+2] = [0.5, 0, -1]  -> rewards [-0.05, 0, 0.1 + score 1 = 1.1]
    #   kl row 1 = [-1+2, pad, pad]     = [1, 0, 0]     -> rewards [-0.1 + score 2 = 1.9, 0, 0]
    rewards, kl = kl_penalized_rewards(t([1.0, 2.0]), t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
                                       t([[-1.5, -2.0, -2.0], [-2.0, 0.0, 9.0]]), t([[1, 1, 1], [1, 0, 0]]), 0.1)
    close(kl, [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 1.1], [1.9, 0.0, 0.0]])
