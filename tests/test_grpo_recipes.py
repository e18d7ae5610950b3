"""The GRPO recipes: the GPU experiment (Qwen2.5-0.5B-Instruct + LoRA on GSM8K with the math verifier)
composes and passes every config rule offline, and its rewards score hand-made completions as intended;
the sft -> grpo chain composes (its run is in tests/test_pipeline.py, slow tier)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmlab.checks import entry as checks
from tests.conftest import CONF


def composed(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_grpo_qwen_gsm8k_experiment_validates_offline(monkeypatch):
    cfg = composed("experiment=grpo_qwen_gsm8k")
    monkeypatch.setattr(checks, "check_hub", lambda cfg: None)  # hub reachability is the machine's, not the recipe's
    checks.check_settings(cfg)
    assert cfg.stage.name == "grpo" and cfg.model.pretrained == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.model.config.model_type == "qwen2" and cfg.model.dtype == "bfloat16"
    assert cfg.peft.method == "lora" and "down_proj" in cfg.peft.target_modules
    # no accelerator named: auto takes the GPU where there is one (llmlab.distributed.devices)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "auto"
    assert (cfg.data.name, cfg.data.config_name, cfg.data.prompt_field) == ("openai/gsm8k", "main", "question")
    assert sorted(cfg.reward) == ["format", "math"] and cfg.stage.module.beta == 0.0
    # the prompt renders in Qwen's chat format with a literal \boxed{}
    prompt = cfg.data.prompt_template.format(prompt="What is 6 x 12?")
    assert prompt.startswith("<|im_start|>system\n") and "\\boxed{}" in prompt
    assert prompt.endswith("What is 6 x 12?<|im_end|>\n<|im_start|>assistant\n")


def test_grpo_qwen_gsm8k_rewards_score_completions():
    """The experiment's reward group, built as the stage builds it (real math-verify)."""
    pytest.importorskip("math_verify")
    from llmlab.rewards import build_rewards

    cfg = composed("experiment=grpo_qwen_gsm8k")
    rewards = build_rewards(OmegaConf.to_container(cfg.reward, resolve=True))
    gold = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    completions = ["48 + 24 = 72, so the answer is \\boxed{72}.",  # right, boxed: 1 + 0.1
                   "She sold 72 clips in all.",                      # right, not boxed: 1
                   "so \\boxed{70}"]                                  # wrong, boxed: 0.1
    total, per_fn = rewards(["q"] * 3, completions, answer=[gold] * 3, completion_tokens=[12, 8, 4],
                            truncated=[False] * 3)
    assert total.tolist() == pytest.approx([1.1, 1.0, 0.1])
    assert per_fn["math"].tolist() == [1.0, 1.0, 0.0] and per_fn["format"].tolist() == [1.0, 0.0, 1.0]
