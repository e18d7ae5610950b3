"""stage=ppo: rollout consistency (the update's first forward reproduces the rollout's log-probs and
values), response masks and lengths, rewards from a rule and from a reward model, runs with and
without PEFT, clear errors; the default run learns (slow tier). The PPO maths (GAE, clipped losses,
KL controller) is checked by hand in tests/test_losses.py."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.conftest import FAST, assert_ok
from tests.test_dpo import tiny_lm

TINY = ["stage=ppo", "model=tiny", *FAST, "stage.module.mini_batch_size=8", "stage.module.ppo_epochs=1",
        "data.batch_size=8"]


def prompt_batch(tok, n: int = 6):
    from llmlab.data import builtin
    from llmlab.data.formats import PromptFormat

    fmt = PromptFormat(tok, block_size=64, prompt_template="Question: {prompt}\n\nAnswer: ")
    return fmt.collate(fmt.build(builtin.ppo_prompts(n, split="train", seed=0), "train"))


def ppo_module(model, tok, **kw):
    from llmlab.stages.ppo import PPOModule

    args = dict(rule_reward="llmlab.data.builtin.rule_reward", rollout_batch_size=6, mini_batch_size=3,
                ppo_epochs=1, response_length=(3, 9))
    args.update(kw)
    return PPOModule(model, tok, optimizer=partial(torch.optim.AdamW, lr=1e-3), **args)


def test_response_mask_budget_and_eos():
    from llmlab.stages.ppo import response_mask

    eos = 9
    responses = torch.tensor([[1, 2, 3, 4, 5],
                              [1, eos, 0, 0, 0],
                              [eos, 1, 1, 1, 1],
                              [1, 2, eos, 4, 5]])
    budgets = torch.tensor([3, 5, 5, 2])
    mask = response_mask(responses, budgets, eos)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0],   # budget 3
                                   [1, 1, 0, 0, 0],   # EOS kept, padding after it dropped
                                   [1, 0, 0, 0, 0],   # EOS first: a one-token response
                                   [1, 1, 0, 0, 0]]   # budget 2 cuts before the EOS
    assert response_mask(responses, budgets, None).sum(1).tolist() == [3, 5, 5, 2]


def test_rollout_is_consistent_with_the_update_forward():
    """Old log-probs and values from the rollout equal a fresh forward of the (unchanged) policy in
    training mode: the first PPO ratio is exactly 1, nothing is clipped at the start."""
    from llmlab.losses import ppo_policy_loss, token_logprobs

    model, tok = tiny_lm()
    module = ppo_module(model, tok)
    batch = prompt_batch(tok)
    ro = module.rollout(batch)
    P, mask = ro["prompt_width"], ro["mask"]
    B, R = mask.shape
    assert ro["logprobs"].shape == ro["values"].shape == ro["advantages"].shape == (B, R)
    lengths = mask.sum(1)
    assert (lengths >= 1).all() and (lengths <= 9).all()
    module.model.train()
    logits, values = module.policy_forward(ro["input_ids"], ro["attention_mask"], ro["position_ids"])
    logprobs = token_logprobs(logits, ro["input_ids"])[:, P - 1:]
    torch.testing.assert_close(logprobs[mask], ro["logprobs"][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(values[:, P - 1:-1][mask], ro["values"][mask], atol=1e-5, rtol=0)
    _, clip_frac, approx_kl = ppo_policy_loss(logprobs, ro["logprobs"], ro["advantages"], mask)
    assert float(clip_frac) == 0.0 and float(approx_kl) == pytest.approx(0.0, abs=1e-6)
    # the rollout's generation sampled from the same distribution it scores: generate's own positions
    # for left-padded prompts are the ones used here
    assert ro["kl"].abs().max() < 1e-5  # policy == reference at the start: zero KL
    # rewards come from the rule on the decoded text
    from llmlab.data.builtin import rule_reward

    expected = [rule_reward(t, a) for t, a in zip(ro["texts"], batch["answers"])]
    torch.testing.assert_close(ro["score"], torch.tensor(expected))


def test_fixed_lengths_without_eos():
    model, tok = tiny_lm()
    module = ppo_module(model, tok, stop_at_eos=False, response_length=(4, 4))
    ro = module.rollout(prompt_batch(tok))
    assert ro["mask"].sum(1).tolist() == [4] * 6


def test_update_changes_policy_and_value_head():
    model, tok = tiny_lm()
    module = ppo_module(model, tok)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda *a, **k: None
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    stats = module.ppo_update(module.rollout(prompt_batch(tok)))
    assert set(stats) >= {"policy_loss", "value_loss", "clip_frac", "approx_kl"}
    changed = {n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.startswith("value_head") for n in changed) and any(n.startswith("model.") for n in changed)
    assert not any(n.startswith("reference") for n in changed)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_ppo_runs_with_rule_reward(cli, peft):
    run = cli(*TINY, f"peft={peft}")
    assert_ok(run)
    s = run.summary
    for key in ("reward_mean_first", "reward_mean_last", "kl_last", "train_entropy_last", "train_clip_frac_last",
                "train_value_loss_last", "train_kl_last", "val_reward_mean_first", "val_reward_mean_last"):
        assert key in s and s[key] is not None, key
    assert s["global_step"] == 6 and s["ppo_iterations"] == 6
    assert (run.dir / "hf" / "config.json").is_file()


def test_ppo_with_a_trained_reward_model(cli):
    rm = cli("stage=rm", "model=tiny", *FAST)
    assert_ok(rm)
    run = cli(*TINY, f"stage.reward_model={rm.dir}", "trainer.max_steps=2")
    assert_ok(run)
    assert run.summary["reward_mean_first"] is not None


def test_ppo_without_reward_is_refused(cli):
    run = cli(*TINY, "stage.rule_reward=null")
    assert run.returncode == 2
    assert "no reward source" in run.stderr and "stage.reward_model" in run.stderr


def test_reward_model_must_be_a_sequence_classifier(cli, tmp_path):
    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    run = cli(*TINY, f"stage.reward_model={tmp_path / 'lm'}")
    assert run.returncode == 2
    assert "not a sequence classifier" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 4 target unverified on an idle machine: PPO starts from the tiny-sft base, whose SFT does not learn yet (issue 3)")
def test_default_ppo_learns(cli):
    """Issue target with the defaults: mean reward over the last tenth of training clearly above the
    first tenth, KL to the reference bounded."""
    run = cli("stage=ppo", "trainer.enable_progress_bar=false")
    assert_ok(run)
    s = run.summary
    assert s["reward_mean_last"] > s["reward_mean_first"] + 0.1, s
    assert s["kl_last"] < 10.0, s
