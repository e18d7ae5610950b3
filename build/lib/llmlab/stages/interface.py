"""What the run reads from a stage module, declared in one place.

Every stage is `class XModule(Stage)`: a LightningModule plus the few things `train.py`, the data
module and `RunSummary` ask of it. Each has a default here, so a stage overrides only what it needs,
and nothing outside a stage looks for attributes with `hasattr`/`getattr`:

| member | read by | default |
|---|---|---|
| `data_format` | `train.py` -> `LLMDataModule` (which collator builds its batches) | (required) |
| `trainer_overrides(trainer_cfg)` | `train.py`, when it builds the Trainer | `{}` |
| `max_grad_norm` | `train.py`, when it builds a DeepSpeed strategy (manual optimization only) | `None` |
| `batches_done()` | `LLMDataModule` on resume (where the sampler continues) | `None` |
| `summary_values(summary)` | `RunSummary`, once at fit end on rank 0 | `{}` |
| `step_guard` | `callbacks.nonfinite.NonFiniteGuard` (set by `common.configure_optimizers`) | `None` |

`RolloutStage` (ppo, grpo): a training batch is one rollout of `steps_per_iteration` optimizer steps
with one `history` row; it answers `trainer_overrides` and `batches_done` for both.

`Stage.on_fit_start` puts the module in train mode (a model loaded with from_pretrained comes in eval
mode, which Lightning keeps); a stage overriding the hook calls it first.

Callbacks that add keys to summary.json implement the same `summary_values(summary)`
(`SummarySource`); a stage never searches `trainer.callbacks`, and `RunSummary` is the one writer of
summary.json during a fit.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L


@runtime_checkable
class SummarySource(Protocol):
    """Anything that adds literal keys to summary.json: the stage module and callbacks."""

    def summary_values(self, summary: dict) -> dict:
        """Keys to add; `summary` is what RunSummary has so far (run info, `*_first`/`*_last`)."""


class Stage(L.LightningModule):
    """A training stage: a LightningModule with the members the run reads (module docstring)."""

    data_format: str
    # the norm a manual-optimization stage (ppo, grpo) clips its gradients to. Lightning refuses
    # `Trainer(gradient_clip_val=...)` with manual optimization, and under DeepSpeed the stage's own
    # `clip_gradients` is a no-op (the engine clips inside `step()`), so train.py hands this value to a
    # DeepSpeed strategy as its `gradient_clipping`.
    max_grad_norm: float | None = None
    step_guard = None  # llmlab.optim.StepGuard of the optimizer, once configure_optimizers ran

    def on_fit_start(self):
        # from_pretrained returns its model in eval mode and Lightning keeps the modes it finds: without
        # this, a stage starting from loaded weights would train with dropout off and transformers'
        # gradient checkpointing skipped (it runs only `if self.training`). Frozen parts stay in eval mode
        # (alignment.FrozenReference.train). Stages that override this hook call it first.
        self.train()

    def trainer_overrides(self, trainer_cfg) -> dict:
        """Trainer kwargs this stage needs on top of `cfg.trainer` (e.g. ppo: no automatic clipping)."""
        return {}

    def batches_done(self) -> int | None:
        """Training batches consumed so far, for a stage whose batch is several optimizer steps (ppo,
        grpo); None: `global_step x accumulate_grad_batches` (one batch per micro-step)."""
        return None

    def summary_values(self, summary: dict) -> dict:
        """Literal summary.json keys this stage adds (e.g. rm: `val_accuracy`); called once at fit end."""
        return {}


class RolloutStage(Stage):
    """A stage whose training batch is one rollout (ppo, grpo): `steps_per_iteration` optimizer steps
    (manual optimization) and one row appended to `history` per rollout."""

    history: list[dict]
    steps_per_iteration: int  # a property of each stage

    def trainer_overrides(self, trainer_cfg) -> dict:
        """No automatic clipping (manual optimization clips here); a validation interval given in optimizer
        steps converted to rollouts (Lightning counts batches)."""
        out = {"gradient_clip_val": None}
        interval = trainer_cfg.get("val_check_interval")
        if isinstance(interval, int):
            out["val_check_interval"] = max(1, interval // self.steps_per_iteration)
        return out

    def batches_done(self) -> int:
        """Prompt batches (rollouts) consumed: where the resumable sampler continues (a rollout is several
        optimizer steps, so global_step x batch would skip prompts on resume)."""
        return len(self.history)

    def stop_if_no_room(self) -> None:
        """At the end of a training step: stop here (after a validation) when another rollout would pass
        `trainer.max_steps`."""
        max_steps = self.trainer.max_steps
        if max_steps and max_steps > 0 and self.global_step + self.steps_per_iteration > max_steps:
            self.trainer.should_stop = True
