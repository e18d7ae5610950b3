"""InjectNaN: fault injection that makes a chosen rank's logits NaN at chosen optimizer steps.

For tests of the non-finite guard, and for a user checking how their cluster behaves when one
process diverges. A forward hook on the stage's model multiplies the output logits by NaN during
training forwards (grad enabled, trainer training), so the loss *and* every gradient upstream really
go NaN, exactly as a numerical blow-up would; validation, generation and no-grad forwards (PPO
rollouts, DPO's reference) are untouched.

    python -m llmlab.run stage=sft +callbacks.nan._target_=llmlab.callbacks.faults.InjectNaN \
        +callbacks.nan.step=3 +callbacks.nan.rank=1 +callbacks.nan.count=-1

step: the first optimizer step to poison, 1-based as history.json and the guard's messages count
(the forwards of step k run while `trainer.global_step == k - 1`); count: how many steps (-1: every step from
`step` on); rank: the process to poison (null: all).
"""
from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger("llmlab")


class InjectNaN(L.Callback):
    def __init__(self, step: int, count: int = 1, rank: int | None = 0):
        self.step, self.count, self.rank = int(step), int(count), rank
        self._handle = None

    def active(self, trainer) -> bool:
        """Poison this forward? Only training forwards with grad, on the chosen rank and steps."""
        if not (trainer.training and torch.is_grad_enabled()):
            return False
        if self.rank is not None and trainer.global_rank != int(self.rank):
            return False
        s = trainer.global_step + 1  # the optimizer step this forward belongs to, 1-based as history.json
        return s >= self.step and (self.count < 0 or s < self.step + self.count)

    def on_train_start(self, trainer, pl_module):
        def poison(module, args, output):
            if not self.active(trainer):
                return output
            logits = output.logits if hasattr(output, "logits") else output  # (B, T, V) or (B, 1)
            poisoned = logits * float("nan")
            if hasattr(output, "logits"):
                output.logits = poisoned  # ModelOutput: attribute and item stay in sync
                return output
            return poisoned

        self._handle = pl_module.model.register_forward_hook(poison)
        log.warning("fault injection: NaN logits on rank %s at global steps %d..%s", self.rank, self.step,
                    "end" if self.count < 0 else self.step + self.count - 1)

    def on_train_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
