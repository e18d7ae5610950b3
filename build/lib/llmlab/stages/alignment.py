"""Pieces the preference stages (rm, dpo, ppo, grpo) share, as functions and one small class.

- `FrozenReference`: the frozen reference policy of DPO and PPO. With PEFT it is the same model with
  the adapter disabled (no second copy in memory); otherwise a frozen copy of the starting weights,
  or a model loaded from `reference_model` (a run dir or HF path).
- `hf_dir`: a run dir or an HF directory/hub name -> what `from_pretrained` should load.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmlab.errors import ConfigError
from llmlab.models.peft import is_peft_model


def hf_dir(path: str) -> str:
    """`<run_dir>` -> `<run_dir>/hf` when it holds an export; anything else is returned as given."""
    p = Path(path).expanduser()
    return str(p / "hf") if (p / "hf" / "config.json").is_file() else str(path)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0. Policy-gradient ratios and DPO log-prob differences
    compare two forward passes; dropout noise in either makes them wrong (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FrozenReference(nn.Module):
    """The reference policy pi_ref: `with ref.model() as m: m(...)` gives it under no_grad.

    - PEFT policy: the policy itself with its adapter disabled (`PeftModel.disable_adapter`), so the
      reference is exactly the base weights and costs no memory.
    - `reference`: a ready model (e.g. loaded from `reference_model=`), frozen.
    - otherwise: a frozen deep copy of the policy at construction time (the starting checkpoint).
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | None = None):
        super().__init__()
        self.shares_policy = reference is None and is_peft_model(policy)
        self._policy = [policy]  # a list: not a submodule (no second registration of the policy)
        self.copy = None if self.shares_policy else freeze(reference if reference is not None
                                                              else copy.deepcopy(policy))

    def train(self, mode: bool = True):  # the copy stays in eval mode whatever Lightning asks
        super().train(mode)
        if self.copy is not None:
            self.copy.eval()
        return self

    @contextlib.contextmanager
    def model(self):
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
                return
            policy = self._policy[0]
            was_training = policy.training
            policy.eval()
            try:
                with policy.disable_adapter():
                    yield policy
            finally:
                policy.train(was_training)


def load_reference(path: str, policy_tokenizer, dtype=None):
    """A causal LM to use as the reference, refusing one whose tokenizer differs from the policy's."""
    source = hf_dir(path)
    check_same_tokenizer(source, policy_tokenizer, "reference_model")
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"reference_model={path}: cannot load a causal LM from it ({err})") from None


def tokenizers_match(a, b) -> bool:
    """Same token -> id mapping and the same special tokens: log-probs are comparable."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.pad_token_id == b.pad_token_id)


def check_same_tokenizer(path: str, policy_tokenizer, setting: str) -> None:
    try:
        other = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{setting}={path}: cannot load its tokenizer ({err})") from None
    if other.pad_token is None:
        other.pad_token = other.eos_token
    if not tokenizers_match(other, policy_tokenizer):
        raise ConfigError(f"{setting}={path}: its tokenizer differs from the policy's (vocab of "
                          f"{len(other)} vs {len(policy_tokenizer)} tokens, or other special tokens); "
                          f"log-probs of the two models are not comparable. Use a reference trained from "
                          f"the same base as the policy, or leave {setting} unset (the starting checkpoint)")

