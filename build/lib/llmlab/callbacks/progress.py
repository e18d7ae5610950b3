"""StepProgressBar: one bar over optimizer steps (step/max_steps, loss, tokens/s, time left).

Lightning's bars count batches per epoch; llmlab's loaders are endless (max_epochs=-1), so they showed
"Epoch 0/-2". On a terminal this is a live Rich bar; in a log file (Slurm, CI) it is a plain line at
every tenth of the run, so a log stays short and still shows the run moving.
"""
from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.callbacks.progress import ProgressBar
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from llmlab.stages.common import count_tokens

log = logging.getLogger("llmlab")


class StepProgressBar(ProgressBar):
    def __init__(self, refresh_seconds: float = 0.5):
        super().__init__()
        self.enabled, self.refresh_seconds = True, refresh_seconds
        self._progress = self._task = None
        self._tokens, self._seconds, self._t_last, self._t_draw = 0, 0.0, None, 0.0
        self._next_line = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _stats(self, trainer) -> str:
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"loss {float(loss):.4f}"] if loss is not None else []
        if self._seconds > 0:
            parts.append(f"{self._tokens / self._seconds:,.0f} tok/s")
        return "  ".join(parts)

    def on_train_start(self, trainer, pl_module) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        self._total = max(trainer.max_steps, 1)
        if sys.stdout.isatty():
            self._progress = Progress(TextColumn("step"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self._total, completed=trainer.global_step,
                                                 stats="")
        self._next_line = trainer.global_step + max(1, self._total // 10)
        self._t_start, self._step_start = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        now = time.perf_counter()
        if self._t_last is not None:  # time between batch ends: validation excluded (below)
            self._seconds += now - self._t_last
            self._tokens += count_tokens(batch) * trainer.world_size
        self._t_last = now
        step = trainer.global_step
        if self._progress is not None:
            if now - self._t_draw >= self.refresh_seconds or step >= self._total:
                self._progress.update(self._task, completed=step, stats=self._stats(trainer))
                self._t_draw = now
        elif step >= self._next_line or step >= self._total:
            self._next_line = step + max(1, self._total // 10)
            done = (step - self._step_start) / max(now - self._t_start, 1e-9)
            left = (self._total - step) / done if done > 0 else float("nan")
            log.info("step %d/%d  %s  %s left", step, self._total, self._stats(trainer), _clock(left))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._t_last is not None:
            self._t_last += time.perf_counter() - self._t_val

    def on_train_end(self, trainer, pl_module) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step, stats=self._stats(trainer))
            self._progress.stop()
            self._progress = None


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: no step timed yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
