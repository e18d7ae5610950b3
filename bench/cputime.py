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


class StepTimes(L.Callback):
    """Each training step's wall and CPU seconds (time between consecutive train batch ends), validation
    and the first step excluded, as bench/nanogpt_shakespeare.py times nanoGPT's steps. With
    `profile_from`/`profile_to` (steps), cProfile runs over that window and its stats go to `path`.prof."""

    def __init__(self, path: str, profile_from: int | None = None, profile_to: int | None = None):
        self.path, self.last, self.wall, self.cpu = path, None, [], []
        self.window, self.profiler = (profile_from, profile_to), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = (time.perf_counter(), time.process_time())
        if self.last is not None:
            self.wall.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
        self.last = now
        step = trainer.global_step
        if self.window[0] is not None and step == self.window[0]:
            import cProfile  # lazy: only when profiling

            self.profiler = cProfile.Profile()
            self.profiler.enable()
        elif self.profiler is not None and step == self.window[1]:
            self.profiler.disable()
            self.profiler.dump_stats(self.path + ".prof")
            self.profiler = None

    def on_validation_start(self, trainer, pl_module):
        self._t_val = (time.perf_counter(), time.process_time())

    def on_validation_end(self, trainer, pl_module):
        if self.last is not None:  # validation is not a step's time
            self.last = (self.last[0] + time.perf_counter() - self._t_val[0],
                         self.last[1] + time.process_time() - self._t_val[1])

    def on_train_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"wall": self.wall, "cpu": self.cpu}, f)
