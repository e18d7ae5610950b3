"""NonFiniteGuard: a diverging run skips its bad updates and, after a streak of them, stops cleanly.

The skip itself happens in the optimizer (`llmlab.optim.StepGuard`, installed by
`stages.common.configure_optimizers`): an update whose loss or gradients are NaN/inf on any rank is
skipped on all ranks. This callback feeds it (each micro-batch loss, the step window), counts skipped
steps (`train/skipped_steps`, summary.json `skipped_steps`), keeps checkpoints from being written at a
skipped step (so the newest checkpoint predates a bad streak), and after `max_bad_steps` skipped steps
in a row stops the run on every rank: summary.json `status: diverged`, and `llmlab.run` exits 1.

Under DeepSpeed ZeRO, DeepSpeed itself drops a step whose global gradient norm is NaN/inf before the
base optimizer is reached (fp32 always; bf16 when `bf16.check_grad_overflow`); that step counts as
skipped here too (`engine.optimizer.overflow`, the same on all ranks).
"""
from __future__ import annotations

import logging

import lightning as L

from llmlab.errors import ConfigError, RunDiverged

log = logging.getLogger("llmlab")


def deepspeed_skipped(trainer) -> bool:
    """Whether DeepSpeed dropped the last step itself (overflow / non-finite gradient norm)."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    return bool(getattr(getattr(engine, "optimizer", None), "overflow", False))


class NonFiniteGuard(L.Callback):
    def __init__(self, max_bad_steps: int = 3):
        if int(max_bad_steps) < 1:
            raise ConfigError(f"trainer.max_bad_steps={max_bad_steps}: use 1 or more")
        self.max_bad_steps = int(max_bad_steps)
        self.diverged_at: int | None = None     # global step at which the run was stopped
        self.streak_start: int | None = None    # step of the first update of the current streak
        self.last_good: str | None = None       # newest checkpoint when the run diverged
        self._resumed_skipped = 0
        self._module = None                     # the stage, from on_train_start
        self._logged: float | None = None       # train/skipped_steps as last logged

    @staticmethod
    def guard(pl_module):
        """The stage's StepGuard (`Stage.step_guard`); None before training started or without one."""
        return getattr(pl_module, "step_guard", None) if pl_module is not None else None

    # --- resume: the count of skipped steps travels in the checkpoint ---
    def state_dict(self) -> dict:
        return {"skipped_steps": self._skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed_skipped = int(state_dict.get("skipped_steps", 0))

    def on_train_start(self, trainer, pl_module):
        if (g := self.guard(pl_module)) is not None:
            g.skipped += self._resumed_skipped
        self._resumed_skipped = 0
        self._module, self._logged = pl_module, None

    @property
    def _skipped(self) -> int:
        g = self.guard(self._module)
        return (g.skipped if g is not None else 0) + self._resumed_skipped

    # --- feeding the optimizer's guard ---
    def on_before_backward(self, trainer, pl_module, loss):
        if (g := self.guard(pl_module)) is not None:
            g.note_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._end_step(trainer, pl_module)  # manual optimization: the previous step of this batch
        if (g := self.guard(pl_module)) is not None:
            g.begin_step()
            self._step = trainer.global_step + 1  # the update being made, 1-based as history.json counts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end_step(trainer, pl_module)
        # the same on every rank. Logged when it changes, at the first step and at the steps whose metrics
        # go to the loggers (Lightning's own test in update_train_step_metrics, right after this hook), not at
        # every step: `callback_metrics` (what RunSummary and the progress bar read) still holds the current
        # count at every step, and a Lightning `log` call costs ~0.35 ms of CPU (~1% of a step of the 0.8M
        # nanoGPT recipe at 2 threads; bench/RESULTS.md nanogpt_shakespeare)
        skipped = float(self._skipped)
        if skipped != self._logged or trainer._logger_connector.should_update_logs:
            pl_module.log("train/skipped_steps", skipped)
            self._logged = skipped

    def _end_step(self, trainer, pl_module) -> None:
        g = self.guard(pl_module)
        if g is None or not g._open:
            return
        by_strategy = g._decision is None and deepspeed_skipped(trainer)
        if not g.end_step(skipped_elsewhere=by_strategy):
            self.streak_start = None
            return
        if self.streak_start is None:
            self.streak_start = self._step
        log.warning("non-finite loss or gradients at step %d: update skipped on all ranks (%d in a row%s)",
                    self._step, g.bad_streak, "; by DeepSpeed's overflow check" if by_strategy else "")
        self._hold_checkpoints(trainer)
        if g.bad_streak >= self.max_bad_steps and self.diverged_at is None:
            self.diverged_at = trainer.global_step
            self.last_good = self._newest_checkpoint(trainer)  # all written before the streak (held since)
            trainer.should_stop = True  # every rank took the same (all-reduced) decisions

    def _hold_checkpoints(self, trainer) -> None:
        """No checkpoint at a skipped step, nor at the end of a diverged run: the newest checkpoint
        then predates the bad streak, and `resume=auto` restarts before it.

        Weights are finite either way (the guard never applies a bad update); this is about which step
        a resume starts from. ModelCheckpoint saves after this hook (Lightning runs checkpoint callbacks
        last) unless it already saved at this global step, and at train end unless it saved at all;
        setting those two records is the only veto it offers (Lightning 2.6 private attributes).
        """
        for cb in trainer.checkpoint_callbacks:
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step
            if self.diverged_at is not None and hasattr(cb, "_last_checkpoint_saved"):
                cb._last_checkpoint_saved = cb._last_checkpoint_saved or "(held: run diverged)"

    @staticmethod
    def _newest_checkpoint(trainer) -> str | None:
        cb = trainer.checkpoint_callback
        return (getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") or None) if cb else None

    # --- the outcome ---
    def outcome(self) -> dict:
        """Keys for summary.json."""
        out = {"skipped_steps": self._skipped}
        if self.diverged_at is not None:
            out.update(status="diverged", diverged_at_step=self.diverged_at,
                       bad_streak_start=self.streak_start, last_good_checkpoint=self.last_good)
        return out

    def on_train_end(self, trainer, pl_module):
        if self.diverged_at is not None:
            self._hold_checkpoints(trainer)  # ModelCheckpoint.on_train_end runs after this hook

    def summary_values(self, summary: dict) -> dict:  # SummarySource: RunSummary asks at fit end
        return self.outcome()

    def error(self, trainer) -> RunDiverged | None:
        """The error a diverged run ends with (None when it did not diverge)."""
        if self.diverged_at is None:
            return None
        o = self.outcome()
        return RunDiverged(
            f"run diverged at step {self.diverged_at}: {self.max_bad_steps} non-finite updates in a row "
            f"from step {o['bad_streak_start']} skipped ({o['skipped_steps']} in all); "
            f"last good checkpoint: {o['last_good_checkpoint']}", report=trainer.is_global_zero)
