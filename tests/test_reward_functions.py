"""llmlab/rewards.py: each reward function on hand-made completions; combining, checking and the
one-line errors naming the reward entry; a user `module:function` reward through the CLI."""
from __future__ import annotations

import pytest
import torch

from llmlab.errors import ConfigError
from llmlab.rewards import (FormatReward, LengthPenalty, MathVerifyReward, Rewards, TaskReward, UserReward,
                            build_rewards, check_rewards, gold_answer)
from tests.conftest import FAST, assert_ok

PROMPTS = ["reverse abc"] * 4


def test_task_reward_partial_and_exact():
    completions, answers = ["cba", "cbx", "", "cbaa"], ["cba"] * 4
    # rule_reward: 1 exact; else 0.9 x matching positions / max(len) (2/3, 0, 3/4)
    assert TaskReward()(PROMPTS, completions, answer=answers) == pytest.approx([1.0, 0.6, 0.0, 0.675])
    assert TaskReward(exact=True)(PROMPTS, completions, answer=answers) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="needs a reference answer"):
        TaskReward()(PROMPTS, completions, answer=[None] * 4)


def test_task_reward_judges_the_answer_after_a_thinking_block():
    """A thinking model (Qwen 3) writes <think>...</think> before its answer: the task reward judges the answer,
    as validation's exact match does (evaluation.metrics.normalize_answer); reasoning that never closes
    answered nothing."""
    answers = ["cba", "cba", "cba"]
    completions = ["<think>\nreverse: c b a\n</think>\n\ncba", "<think>\nmaybe cba</think>abc", "<think>\ncba"]
    assert TaskReward(exact=True)(PROMPTS[:3], completions, answer=answers) == [1.0, 0.0, 0.0]
    partial = TaskReward()(PROMPTS[:3], completions, answer=answers)
    assert partial[0] == 1.0 and partial[1] < 1.0 and partial[2] == 0.0


def test_format_and_length_rewards():
    fmt = FormatReward("[a-h]+")
    assert fmt(PROMPTS, ["abc", " abc\n", "ab1", "Abc"]) == [1.0, 1.0, 0.0, 0.0]
    assert FormatReward(r"#### \d+", search=True)(PROMPTS, ["so #### 12", "12", "####12", "#### 1 ok"]) == \
        [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="reward.format.pattern"):
        FormatReward("([")
    length = LengthPenalty(target=4)
    assert length(PROMPTS, ["a", "b", "c", "d"], completion_tokens=[2, 4, 6, 12]) == [0.0, 0.0, -0.5, -2.0]
    assert length(PROMPTS, ["abcdef", "ab", "abcd", ""]) == [-0.5, 0.0, 0.0, 0.0]  # characters without tokens


def test_math_verify_reward_with_gsm8k_answers():
    assert gold_answer("She has 3 + 4 = 7 apples.\n#### 1,200") == "1200"
    reward = MathVerifyReward()
    completions = ["The answer is $1200$.", "so it is \\frac{2400}{2}", "1201", "no idea"]
    assert reward(PROMPTS, completions, answer=["... #### 1,200"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert reward(["q"], ["x = 0.5"], answer=["\\frac{1}{2}"]) == [1.0]
    with pytest.raises(ConfigError, match="answer_field=solution"):
        MathVerifyReward("solution")(["q"], ["1"], answer=["1"])


def brevity(prompts, completions, **fields):
    return [1.0 / (1 + len(c)) for c in completions]


def test_user_reward_and_combination():
    user = UserReward("tests.test_reward_functions:brevity")
    assert user(PROMPTS, ["", "abc"]) == [1.0, 0.25]
    rewards = Rewards({"task": TaskReward(), "short": user}, {"task": 1.0, "short": 2.0})
    total, per = rewards(["p", "p"], ["cba", "abc"], answer=["cba", "cba"])
    torch.testing.assert_close(per["short"], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(total, torch.tensor([1.0, 0.3]) + 2 * 0.25)


def test_reward_errors_name_the_entry():
    with pytest.raises(ConfigError, match=r"reward.user.fn=no_such_module_x:f: cannot import"):
        UserReward("no_such_module_x:f")
    with pytest.raises(ConfigError, match="is not a function"):
        UserReward("llmlab.data.builtin:ALPHABET")
    with pytest.raises(ConfigError, match=r"reward.mine: returned 1 values for 2 completions"):
        check_rewards([1.0], 2, "mine")
    with pytest.raises(ConfigError, match=r"reward.mine: returned non-numeric reward 'a'"):
        check_rewards([1.0, "a"], 2, "mine")
    with pytest.raises(ConfigError, match=r"reward.mine: returned non-numeric reward None"):
        check_rewards([None, 1.0], 2, "mine")
    with pytest.raises(ConfigError, match=r"reward.mine: returned float"):
        check_rewards(1.0, 2, "mine")
    with pytest.raises(ConfigError, match=r"reward.bad._target_=llmlab.rewards.NoSuch: cannot build it"):
        build_rewards({"bad": {"_target_": "llmlab.rewards.NoSuch", "weight": 1.0}})
    built = build_rewards({"task": {"_target_": "llmlab.rewards.TaskReward", "weight": 0.5, "exact": True}})
    assert built.weights == {"task": 0.5} and built.functions["task"].exact
    with pytest.raises(ConfigError, match="no reward function selected"):
        build_rewards({})


@pytest.mark.slow
def test_user_reward_through_the_cli(cli, tmp_path):
    """'reward=[task,user]' with a user module:function on PYTHONPATH; each reward logged separately.
    A user function returning the wrong length stops the run with one line naming it."""
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, completion_tokens, truncated, answer, **fields):\n"
        "    assert len(answer) == len(completions) == len(completion_tokens)\n"
        "    return [-0.1 * n for n in completion_tokens]\n"
        "def broken(prompts, completions, **fields):\n"
        "    return [0.0]\n")
    import os
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["stage=grpo", "model=tiny", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=1",
              "data.batch_size=2", "stage.module.num_generations=2", "stage.module.max_completion_length=4"]
    run = cli(*common, "reward=[task,user]", "reward.user.fn=my_rewards:short", env=env)
    assert_ok(run)
    s = run.summary
    assert s["train_reward_user_last"] <= -0.1 and "train_reward_task_last" in s
    assert s["train_reward_mean_last"] == pytest.approx(s["train_reward_task_last"] + s["train_reward_user_last"],
                                                        abs=1e-5)
    bad = cli(*common, "reward=[user]", "reward.user.fn=my_rewards:broken", env=env)
    assert bad.returncode == 2 and "llmlab: error: reward.user: returned 1 values for 2 completions" in bad.stderr
    assert "Traceback" not in bad.stderr
