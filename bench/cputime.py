"""A Lightning callback for benchmarks: this process's CPU seconds per training step, next to wall seconds.

On a shared machine a process at one thread gets only part of a core; its CPU time (user + sys) is what
the steps cost on an otherwise idle core (cache and memory-bandwidth sharing aside), wall time what they
took here. Like RunSummary, the first step is not timed. Used by bench/cpu_mfu.py through
`+callbacks.cputime._target_=cputime.StepCPUTime +callbacks.cputime.path=...` with bench/ on PYTHONPATH.
"""
from __future__ import annotations

import json
import time

import lightning as L


class StepCPUTime(L.Callback):
    def __init__(self, path: str):
        self.path, self.last, self.cpu, self.wall, self.steps = path, None, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = (time.process_time(), time.perf_counter())
        if self.last is not None:
            self.cpu += now[0] - self.last[0]
            self.wall += now[1] - self.last[1]
            self.steps += 1
        self.last = now

    def on_train_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"cpu_seconds": self.cpu, "wall_seconds": self.wall, "timed_steps": self.steps}, f)
