"""StopAtStep: end a run after N optimizer steps while schedules stay planned for trainer.max_steps.

For time-sliced work (train 1000 of 5000 planned steps now, `resume=auto` later) and for tests that
simulate an interruption. A checkpoint is written at the stopping step so nothing is lost.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from llmlab.checkpointing.checkpoints import save_checkpoint_atomic


class StopAtStep(L.Callback):
    def __init__(self, step: int, dirpath: str):
        self.step, self.dirpath = int(step), Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not trainer.should_stop:
            save_checkpoint_atomic(trainer, self.dirpath / "last.ckpt")  # survives kill -9, keeps the previous
            trainer.should_stop = True
