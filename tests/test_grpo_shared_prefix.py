"""stage=grpo's shared-prompt forward (llmlab/stages/shared_prefix.py): the prompt run once per group gives
the log-probs, entropies and gradients of the plain forward over whole rows, on rows in any order and from
any mix of groups (a shuffled mini-batch); prompt-learning PEFT falls back to the plain forward."""
from __future__ import annotations

import pytest
import torch

from tests.test_dpo import tiny_lm
from tests.test_grpo import grpo_module
from tests.test_ppo import prompt_batch


def logprobs_and_grads(model, module, ro, idx):
    model.zero_grad()
    logprobs, entropy = module.completion_logprobs(model, ro, idx, entropy=True)
    (logprobs * ro["mask"][idx]).sum().backward()  # mask: the padding after EOS is not compared
    return logprobs.detach(), entropy, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("idx", [[5, 0, 13, 2, 7, 22, 23], list(range(24))])
def test_shared_prompt_forward_equals_the_full_forward(idx):
    model, tok = tiny_lm()
    ro = grpo_module(model, tok).rollout(prompt_batch(tok))  # 6 prompts x 4 completions
    idx = torch.tensor(idx)
    mask = ro["mask"][idx]
    shared = logprobs_and_grads(model, grpo_module(model, tok, share_prompt=True), ro, idx)
    full = logprobs_and_grads(model, grpo_module(model, tok, share_prompt=False), ro, idx)
    torch.testing.assert_close(shared[0][mask], full[0][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1][mask], full[1][mask], atol=1e-5, rtol=0)
    for a, b in zip(shared[2], full[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in full[2])


def test_prompt_learning_peft_uses_the_full_forward():
    from peft import PrefixTuningConfig, get_peft_model

    from llmlab.stages.shared_prefix import can_share_prompt

    model, _ = tiny_lm()
    assert can_share_prompt(model)
    prefix = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not can_share_prompt(prefix)


def test_prefilled_generation_samples_what_plain_generate_samples():
    """The rollout with each distinct prompt pre-filled once (its cache repeated for the group) samples the
    very tokens transformers' plain `generate` samples from the whole rows, with the same seed."""
    model, tok = tiny_lm()
    shared = grpo_module(model, tok, share_prompt=True).rollout(prompt_batch(tok))
    plain = grpo_module(model, tok, share_prompt=False).rollout(prompt_batch(tok))
    assert torch.equal(shared["completions"], plain["completions"])
    assert shared["texts"] == plain["texts"] and len(set(shared["texts"])) > 1  # sampled, not one answer
