"""ResumableCSVLogger: metrics.csv that keeps its rows when a run resumes into the same directory.

Lightning's CSVLogger deletes an existing metrics.csv when it starts in a non-empty directory, so a
`resume=auto` run (or a requeued Slurm job) would keep only the part after the resume. This writer
appends instead, continuing with the existing header. Steps trained again after a crash (those after
the last checkpoint) appear twice, as they were trained twice.
"""
from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
