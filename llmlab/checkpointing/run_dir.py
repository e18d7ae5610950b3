"""Nothing is written into a run dir until the run's checks pass (issue 20).

A command aimed at an existing run dir (resume: `hydra.run.dir=<run dir>`) that is refused must leave it
byte-identical, even when two such commands run at once or one is killed mid-way. So:

- Hydra writes no `.hydra/` (`hydra.output_subdir: null`, conf/hydra/default.yaml); `begin(cfg)` keeps in
  memory what it would have written there: `config.yaml` (the job config, unresolved), `hydra.yaml` (the
  hydra node) and `overrides.yaml` (the task overrides), credentials masked;
- the job log (`<run dir>/run.log`) is a `DeferredFileHandler` (conf/hydra/job_logging/llmlab.yaml): it
  opens no file at job start and holds its records in memory;
- `commit()`, called once the checks have passed (llmlab/train.py, after check_config and the resume
  checks), writes the three `.hydra/` files (each atomically, rank 0 only) and opens the log, writing the
  held records first;
- `settle()`, called when the job ends without a commit (a refusal or a crash inside the checks): a run
  dir that was empty when the job started (Hydra had just made it) is committed as before this change
  (its `.hydra/` and run.log, and in a sweep summary.json, say what was refused); an existing one is left
  untouched: the held records are dropped (they were on the console).

A refused command writes nothing into an existing run dir, so concurrent refused commands cannot undo
one another and a SIGKILL at any moment leaves nothing half-done. Used by `python -m llmlab.run`;
`llmlab.pipeline` (no `.hydra/`: `hydra.output_subdir: null`) defers only its `pipeline.log` (`open_logs()`
once its checks pass) and `llmlab.eval` writes no job log.
"""
from __future__ import annotations

import copy
import logging
import os
import weakref
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write

from llmlab.checkpointing.atomic import atomic_write_text
from llmlab.redact import redact_text

HYDRA_SUBDIR = ".hydra"
_HELD_MAX = 10_000  # records held before the checks pass (a run logs a few dozen there)
_handlers: weakref.WeakSet = weakref.WeakSet()
_job: dict = {}  # the current job: dir, fresh, files, committed


class DeferredFileHandler(logging.FileHandler):
    """A FileHandler that opens nothing and holds its records until `commit()` (then writes them and
    every later one, as logging.FileHandler) or `settle()` of a refused run in an existing dir (then
    drops them and every later one)."""

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self._held: list[logging.LogRecord] | None = []  # None: writing to the file
        self._dropped = False
        _handlers.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self._dropped:
            return
        if self._held is not None:
            if len(self._held) < _HELD_MAX:
                self.format(record)  # exception text now, while the traceback is alive
                self._held.append(record)
            return
        super().emit(record)

    def open_log(self) -> None:
        """Create/open the file and write the held records, then every later one."""
        self.acquire()
        try:
            if self._held is None or self._dropped:
                return
            held, self._held = self._held, None
            if self.stream is None:
                self.stream = self._open()
            for record in held:
                super().emit(record)
        finally:
            self.release()

    def drop_log(self) -> None:
        """Write nothing, now or later."""
        self.acquire()
        try:
            if self._held is not None:
                self._held, self._dropped = None, True
        finally:
            self.release()

    def close(self) -> None:
        self.drop_log()  # closed undecided (a job that never reached begin/settle): nothing is written
        super().close()


def _rank() -> int:
    """This process's global rank from the launcher's environment (as lightning's rank_zero_only)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def hydra_files(cfg) -> dict[str, str]:
    """{name: text} of what Hydra 1.3's run_job writes into `<run dir>/.hydra/` for `cfg` (the task config
    it passes to the job): the same YAML, with `hydra.output_subdir: .hydra` (where the files are)."""
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = HYDRA_SUBDIR
    texts = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}
    return {name: redact_text(text) for name, text in texts.items()}  # the command line, verbatim: no secrets


def begin(cfg) -> None:
    """At the start of a Hydra job: note the run dir, whether it is fresh (empty: Hydra just made it) and
    the `.hydra/` files to write. Writes nothing."""
    _job.clear()
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = True
    if run_dir.is_dir():
        with os.scandir(run_dir) as entries:
            fresh = next(entries, None) is None
    # a user's hydra.output_subdir=<name>: Hydra wrote it already, as before this module
    files = hydra_files(cfg) if hc.output_subdir is None and _rank() == 0 else {}
    _job.update(dir=run_dir, fresh=fresh, files=files, committed=False)


def commit() -> None:
    """The checks passed: write `.hydra/{config,hydra,overrides}.yaml` (each atomically) and open the job
    log. Idempotent; nothing without `begin` (train() called outside `python -m llmlab.run`)."""
    if not _job or _job["committed"]:
        return
    _job["committed"] = True
    if _job["files"]:
        out = _job["dir"] / HYDRA_SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        for name, text in _job["files"].items():
            atomic_write_text(out / name, text)
    open_logs()


def open_logs() -> None:
    """Open every deferred job log (write the held records, then every later one). `llmlab.pipeline` calls it
    alone once its checks pass: it writes no `.hydra/`; a refused chain leaves no `pipeline.log` behind."""
    for handler in list(_handlers):
        handler.open_log()


def settle() -> bool:
    """The job ends (or fails) without having committed: commit a fresh run dir (as Hydra did), leave
    an existing one untouched. Returns whether the job may write into its run dir (summary.json of a
    failed sweep job)."""
    if not _job:
        return True
    if not _job["committed"]:
        if _job["fresh"]:
            commit()
        else:
            for handler in list(_handlers):
                handler.drop_log()
    return _job["committed"]
