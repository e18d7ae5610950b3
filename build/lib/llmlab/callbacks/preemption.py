"""SlurmRequeue: at Slurm's time-limit signal, checkpoint at the next step boundary and requeue the job.

Slurm sends SIGUSR1 to every task shortly before the time limit (`#SBATCH --signal=SIGUSR1@90`).
Lightning's own handler (`SLURMEnvironment(auto_requeue=True)`) writes the checkpoint *inside* the signal
handler. Ranks take the signal at different points of their step, so one rank can enter the checkpoint's
collectives (broadcast, barrier) while another waits in the gradient all-reduce: the job then hangs until
Slurm kills it at the time limit, and the slice's work is lost (Lightning issue #21406; it hung one of our
CI runs). Here the handler only sets a flag. After each optimizer step (the same batches on every rank)
the ranks OR their flags with one scalar all-reduce; if any rank was signalled, all of them write
`<run dir>/hpc_ckpt_<n>.ckpt` together, atomically (llmlab.checkpointing.checkpoints), and rank 0 runs
`scontrol requeue <job>`. Slurm stops the job (SIGTERM) and starts it again under the same job id;
`resume=auto` continues from the newest intact checkpoint. train.py installs this callback, with
`SLURMEnvironment(auto_requeue=False)` so that Lightning's handler stays out, whenever it runs as
Slurm tasks (srun); a signal handler installed before (submitit's) is left in charge.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L

from llmlab.checkpointing.checkpoints import save_checkpoint_atomic

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else SLURM_JOB_ID."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def next_hpc_checkpoint(run_dir: Path) -> Path:
    """`hpc_ckpt_<n+1>.ckpt` after the highest n in `run_dir` (the name Lightning gives, and looks for)."""
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt")
               if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    def __init__(self, run_dir: str | Path, signum: int = signal.SIGUSR1):
        self.run_dir, self.signum = Path(run_dir), signum
        self.signalled = False  # set by the handler, on this rank only
        self.requeued = False
        self._previous = None  # the handler ours replaced (restored at teardown)
        self._last_step = -1

    def setup(self, trainer, pl_module, stage):
        current = signal.getsignal(self.signum)
        if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
            log.info("Slurm requeue: %s already has a handler (%s); leaving it in charge",
                     signal.Signals(self.signum).name, getattr(current, "__qualname__", current))
            return
        self._previous = current
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True  # nothing more inside a signal handler: see the module docstring

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.requeued or trainer.global_step == self._last_step:
            return  # within a gradient-accumulation window: not a step boundary
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):  # any rank signalled
            return
        self.requeued = True
        path = Path(trainer.strategy.broadcast(str(next_hpc_checkpoint(self.run_dir))))  # rank 0 names it
        if trainer.is_global_zero:
            log.info("Slurm time-limit signal: checkpoint %s at step %d, then requeue", path, trainer.global_step)
        save_checkpoint_atomic(trainer, path)  # every rank writes its part
        if trainer.is_global_zero:
            job = slurm_job_id()
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if r.returncode == 0:
                log.info("Requeued Slurm job %s (it resumes from %s)", job, path.name)
            else:  # the checkpoint is written: a manual resubmission with resume=auto continues from it
                log.warning("scontrol requeue %s failed (exit %d): %s", job, r.returncode, r.stderr.strip())

    def teardown(self, trainer, pl_module, stage):
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
