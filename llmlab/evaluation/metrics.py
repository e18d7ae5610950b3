"""Metrics on generated text (torchmetrics, so they accumulate over batches and reduce across ranks)."""
from __future__ import annotations

import re

import torch
from torchmetrics import Metric

# A thinking model's reasoning before its answer. Qwen 3 (QwQ alike) writes <think>...</think> first, an empty
# block when thinking is off; DeepSeek-R1's template opens <think> in the generation prompt, so its generation
# holds only the closing tag. The answer is what follows the first </think>; reasoning that never closes (cut
# by max_new_tokens) gave no answer. The same pattern is llmlab_builtin_em's regexes_to_ignore (lm-eval).
REASONING = re.compile(r"^[\s\S]*?</think>|^\s*<think>[\s\S]*")


def final_answer(text: str) -> str:
    """`text` without a leading reasoning block (REASONING)."""
    return REASONING.sub("", text, count=1)


def normalize_answer(text: str) -> str:
    """What exact match compares: the final answer (a leading <think> block removed), surrounding whitespace
    removed. A thinking model is judged on its answer, as its users read it, not on how it reasoned: rendering
    with `enable_thinking=False` instead would measure another behaviour than the one trained and used."""
    return final_answer(text).strip()


class ExactMatch(Metric):
    """Fraction of predictions equal to their reference after `normalize_answer` (0.0 when empty)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"ExactMatch: {len(preds)} predictions for {len(targets)} references")
        self.correct += sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
