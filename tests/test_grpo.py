"""stage=grpo: the first update's gradient is the policy gradient of the group-normalised advantages,
rollout masks, dynamic sampling, the stage under peft {none, lora, qlora} through the CLI, exact resume
after kill -9, and (slow tier) the default run learns. The maths is checked by hand and against TRL in
tests/test_grpo_losses.py."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from tests.conftest import FAST, assert_ok
from tests.test_dpo import tiny_lm
from tests.test_ppo import prompt_batch

TINY = ["stage=grpo", "model=tiny", *FAST, "data.batch_size=4", "stage.module.num_generations=4",
        "stage.module.max_completion_length=6"]


def grpo_module(model, tok, reward=None, **kw):
    from llmlab.rewards import Rewards, TaskReward
    from llmlab.stages.grpo import GRPOModule

    args = dict(rollout_batch_size=6, num_generations=4, max_completion_length=8, max_grad_norm=None)
    args.update(kw)
    return GRPOModule(model, tok, optimizer=partial(torch.optim.SGD, lr=1e-3),
                      reward=reward or Rewards({"task": TaskReward()}), **args)


def offline(module):
    """Lightning's hooks a test drives by hand: a plain optimizer, backward, no scheduler."""
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    return optimizer


def test_first_update_gradient_is_the_group_normalised_policy_gradient():
    """num_iterations=1, beta=0, loss_type=grpo: the gradient of the first update equals
    -1/N sum_i A_i * mean_t grad log pi(o_it) with A = (r - group mean) / (group std + 1e-4), computed
    here directly from the rollout's tokens and rewards with a fresh forward of the tiny model."""
    from llmlab.losses import token_logprobs
    from llmlab.rewards import Rewards, UserReward

    model, tok = tiny_lm()
    # a reward with spread in every group: the completion's length in characters
    module = grpo_module(model, tok, Rewards({"len": UserReward("tests.test_grpo:char_length")}),
                         loss_type="grpo", temperature=1.5)
    optimizer = offline(module)
    ro = module.rollout(prompt_batch(tok))
    grads = {}
    optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in module.model.named_parameters()})
    module.policy_update(ro)

    N, G, P = len(ro["texts"]), 4, ro["prompt_width"]
    rewards = torch.tensor([float(len(t)) for t in ro["texts"]])
    torch.testing.assert_close(ro["rewards"], rewards)
    groups = rewards.view(-1, G)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    model.zero_grad()
    logits = model(input_ids=ro["input_ids"], attention_mask=ro["attention_mask"],
                   position_ids=ro["position_ids"]).logits / 1.5
    logp = token_logprobs(logits, ro["input_ids"])[:, P - 1:]  # (N, R)
    mask = ro["mask"].float()
    objective = (adv * (logp * mask).sum(1) / mask.sum(1)).sum() / N
    (-objective).backward()
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def char_length(prompts, completions, **fields):
    return [float(len(c)) for c in completions]


def copy_is_flat(prompts, completions, **fields):
    """0 for every completion of a `copy` prompt (a group without signal), else the length."""
    return [0.0 if "copy" in p else float(len(c)) + 0.01 * i for i, (p, c) in enumerate(zip(prompts, completions))]


def test_rollout_groups_masks_and_truncation():
    model, tok = tiny_lm()
    module = grpo_module(model, tok, max_completion_length=5, mask_truncated_completions=True)
    batch = prompt_batch(tok)
    ro = module.rollout(batch)
    N, P = 6 * 4, ro["prompt_width"]
    assert ro["input_ids"].shape[0] == N and len(ro["texts"]) == N
    for i in range(6):  # a group is 4 consecutive rows of the same prompt
        assert (ro["input_ids"][i * 4:(i + 1) * 4, :P] == batch["prompt_ids"][i]).all()
    lengths = ro["mask"].sum(1)
    assert (lengths >= 1).all() and (lengths <= 5).all()
    eos = tok.eos_token_id
    ends_eos = torch.tensor([bool((c[m] == eos).any()) for c, m in zip(ro["completions"], ro["mask"])])
    assert ro["truncated"].tolist() == (~ends_eos).tolist()
    # masked truncated completions: no loss tokens
    assert (ro["loss_mask"][ro["truncated"]].sum() == 0) and torch.equal(ro["loss_mask"][~ro["truncated"]],
                                                                          ro["mask"][~ro["truncated"]])
    assert ro["old_logprobs"] is None and ro["ref_logprobs"] is None  # on-policy, beta = 0
    assert module.reference is None  # beta = 0: no reference model was built


def test_dynamic_sampling_drops_flat_groups_and_refills(monkeypatch):
    """Groups of `copy` prompts all score 0 (no signal): dropped, refilled from new training prompts
    until the batch holds only groups with spread, within max_refill_rounds."""
    from llmlab.data import builtin
    from llmlab.data.formats import PromptFormat
    from llmlab.rewards import Rewards, UserReward

    model, tok = tiny_lm()
    module = grpo_module(model, tok, Rewards({"f": UserReward("tests.test_grpo:copy_is_flat")}),
                         dynamic_sampling=True, max_refill_rounds=5)
    fmt = PromptFormat(tok, block_size=64, prompt_template="Question: {prompt}\n\nAnswer: ")
    train_set = fmt.build(builtin.ppo_prompts(64, split="train", seed=0), "train")

    class DM:
        pass

    dm = DM()
    dm.train_set, dm.format = train_set, fmt
    monkeypatch.setattr(type(module), "trainer", property(lambda self: type("T", (), {"datamodule": dm})()))
    batch = prompt_batch(tok)
    flat = sum("copy" in p for p in batch["prompts"])
    assert flat > 0  # the batch has groups to drop
    ro = module.rollout(batch)
    assert len(ro["texts"]) == 24 and ro["refill_rounds"] >= 1
    assert ro["zero_std_share"] == pytest.approx(flat / 6)
    groups = ro["rewards"].view(6, 4)
    assert (groups.std(1) > 0).all()
    # without dynamic sampling the flat groups stay (advantage 0)
    plain = grpo_module(model, tok, Rewards({"f": UserReward("tests.test_grpo:copy_is_flat")})).rollout(batch)
    assert (plain["rewards"].view(6, 4).std(1) == 0).sum() == flat


def test_old_and_reference_logprobs_when_needed():
    """Two passes (num_iterations=2): old log-probs are recorded and equal the first pass's forward (ratio 1);
    beta > 0: reference log-probs from the frozen copy, equal to the policy's at the start (KL 0)."""
    model, tok = tiny_lm()
    module = grpo_module(model, tok, num_iterations=2, beta=0.1)
    ro = module.rollout(prompt_batch(tok))
    mask = ro["mask"]
    torch.testing.assert_close(ro["old_logprobs"][mask], ro["ref_logprobs"][mask], atol=1e-5, rtol=0)
    offline(module)
    stats = module.policy_update(ro)
    assert stats["kl"] >= 0 and math.isfinite(stats["loss"])
    assert module.steps_per_iteration == 2


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_grpo_runs(cli, peft):
    # QLoRA quantizes pretrained weights: the cached tiny SFT base, not a scratch model
    tiny = [a for a in TINY if not a.startswith("model")] + ["model=tiny_sft_early"] if peft == "qlora" else TINY
    run = cli(*tiny, f"peft={peft}", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "stage.module.beta=0.04", "stage.module.num_iterations=1")
    assert_ok(run)
    s = run.summary
    for key in ("reward_mean_first", "reward_mean_last", "kl_last", "train_entropy_last", "train_clip_high_last",
                "train_clip_low_last", "train_zero_std_groups_last", "train_completion_length_max_last",
                "train_truncated_last", "train_reward_task_exact_last", "val_exact_match_first", "val_exact_match_last"):
        assert isinstance(s.get(key), float) and math.isfinite(s[key]), (key, s.get(key))
    assert s["global_step"] == 3 and s["grpo_iterations"] == 3 and s["skipped_steps"] == 0
    assert (run.dir / "hf" / "config.json").is_file() or (run.dir / "hf_adapter").is_dir()


@pytest.mark.slow
def test_grpo_kill9_then_resume_equals_uninterrupted(tmp_path):
    """Checkpoint every rollout; kill -9 after the second save, resume=auto: the same per-rollout rewards
    (same prompts, same sampled completions) and the same final weights as an uninterrupted run."""
    from tests.conftest import run_cli
    from tests.support_matrix import clean_env
    from tests.test_faults import QUICK, final_weights, kill9, save_id, start, wait_for

    overrides = ["stage=grpo", "model=tiny", *QUICK, "trainer.max_steps=6", "data.batch_size=2",
                 "stage.module.num_generations=4", "stage.module.max_completion_length=4",
                 "stage.module.mini_batch_size=4", "stage.module.optimizer.lr=1e-2"]  # 2 steps per rollout
    full = run_cli(tmp_path / "full", *overrides, env=clean_env())
    assert_ok(full)
    run_dir = tmp_path / "killed"
    proc = start(run_dir, *overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt.prev").exists(), proc)
    kill9(proc)
    assert save_id(last) is not None
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] < 6  # killed mid-run
    resumed = run_cli(run_dir, *overrides, "resume=auto", env=clean_env())
    assert_ok(resumed)

    import json

    def rewards(d):
        return [v for _, v in json.loads((d / "history.json").read_text())["train/reward_mean"]]

    assert resumed.summary["global_step"] == full.summary["global_step"] == 6
    assert rewards(run_dir) == pytest.approx(rewards(tmp_path / "full"), rel=1e-6)
    w_got, w_want = final_weights(run_dir), final_weights(tmp_path / "full")
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_default_grpo_learns(cli):
    """Issue 10 point 5 with the defaults (start model=tiny_sft_early, held-out greedy EM ~0.4; binary task
    reward), one thread: the mean reward of the last tenth of the rollouts above the first tenth, and greedy
    held-out exact match above its start, by the issue's +0.15 / +0.10. Measured (conf/stage/grpo.yaml, the
    cosine schedule since 2026-12-07) over 5 seeds at one thread and the default seed at two: reward +0.189 to
    +0.208, EM +0.155 to +0.205; asserted with a margin below the worst seed (a tenth's mean reward has a
    standard error of ~0.02, a 200-prompt EM ~0.035), as other machines differ."""
    # timeout: the first test to need tiny-sft-early builds it (and tiny-pretrained) inside this subprocess
    run = cli("stage=grpo", "trainer.enable_progress_bar=false", env={"OMP_NUM_THREADS": "1"}, timeout=1500)
    assert_ok(run)
    s = run.summary
    # rounded: 0.5 - 0.4 is 0.0999... in floats, and 20 more of 200 prompts right is a gain of +0.10
    assert round(s["reward_mean_last"] - s["reward_mean_first"], 6) >= 0.15, s
    assert round(s["val_exact_match_last"] - s["val_exact_match_first"], 6) >= 0.10, s


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_give_the_whole_batch_gradient(loss_type):
    """micro_batch_size=8 (3 forwards, accumulated) == the whole rollout of 24 in one forward."""
    from llmlab.rewards import Rewards, UserReward

    model, tok = tiny_lm()
    reward = Rewards({"len": UserReward("tests.test_grpo:char_length")})
    ro = grpo_module(model, tok, reward, loss_type=loss_type).rollout(prompt_batch(tok))
    grads = []
    for micro in (None, 8):
        module = grpo_module(model, tok, reward, loss_type=loss_type, micro_batch_size=micro)
        optimizer = offline(module)
        model.zero_grad()
        optimizer.step = lambda: grads.append([p.grad.clone() for p in model.parameters()])
        module._init_rng()
        module.policy_update(ro)
    for whole, split in zip(*grads):
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)
