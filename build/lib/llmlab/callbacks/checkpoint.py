"""AtomicCheckpoint: Lightning's ModelCheckpoint, but every save survives `kill -9` (llmlab.checkpointing.checkpoints).

Same arguments and triggers as `ModelCheckpoint` (conf/callbacks/default.yaml: last.ckpt every
`val_check_interval` steps). What changes is how a checkpoint is written: into `<name>.partial`, then
renamed into place, the previous one kept as `<name>.prev` (see `save_checkpoint_atomic`), and each
checkpoint records the run config it was made under (`checkpoint["llmlab_resume"]`), so a resume under
a changed config is refused before any weights load (`llmlab.checkpointing.resume.check_resume`).
"""
from __future__ import annotations

from pathlib import Path
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from llmlab.checkpointing.checkpoints import remove_checkpoint, save_checkpoint_atomic
from llmlab.checkpointing.resume import RESUME_KEY, run_snapshot


class AtomicCheckpoint(ModelCheckpoint):
    """`config_file`: the run's config_resolved.yaml (written once the resume checks passed): the
    source of the config snapshot stored in each checkpoint. Other arguments: ModelCheckpoint's."""

    def __init__(self, *args, config_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_file = Path(config_file) if config_file else None
        self._snapshot: dict | None = None

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.config_file is not None and self.config_file.is_file():
            self._snapshot = run_snapshot(OmegaConf.load(self.config_file), world_size=trainer.world_size)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._snapshot is not None:  # every checkpoint of the run (hpc_ckpt and StopAtStep too)
            checkpoint[RESUME_KEY] = self._snapshot

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint with an atomic save in place of trainer.save_checkpoint
        save_checkpoint_atomic(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            remove_checkpoint(filepath)
        trainer.strategy.barrier("llmlab_checkpoint_remove")
