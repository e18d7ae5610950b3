"""Implementation of the llmlab Optuna sweeper (imported only when the sweeper is used).

Design
------
* ask/tell: the sweeper asks ``n_jobs`` trials, launches them as one batch through the configured
  Hydra launcher (basic, joblib, submitit, ...), and tells each result. A job that raises, returns
  None, NaN or a non-number is told FAIL with its error (user attr ``error``); the sweep goes on.
* ``n_trials`` is the planned total of COMPLETE trials in the study, not "trials to run now".
* Resume: the study lives in persistent storage (default: a JournalStorage file in the sweep dir).
  On start the sweeper loads it, marks trials left RUNNING by a killed sweeper FAIL
  (``error: interrupted``), enqueues their params again (``retry_of``), and runs until the study has
  ``n_trials`` COMPLETE trials. COMPLETE trials are never run again.
* One sweeper process per study: an exclusive flock on ``<sweep_dir>/.llmlab_optuna.lock``. (A second
  process could otherwise take the first one's RUNNING trials for interrupted ones.)
* Hydra job numbers (``hydra.job.num`` and the job sub-dir) keep counting across restarts, so a
  restarted sweep never overwrites the job dirs of an earlier start; each trial records its
  ``job_idx``, ``job_dir`` and ``overrides``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmlab.redact import redact, redact_text, redacted_yaml

from ._search_space import Param, SearchSpaceError, build_search_space

log = logging.getLogger(__name__)

DEFAULT_JOURNAL = "optuna_journal.log"
RESULTS_FILE = "optimization_results.yaml"
LOCK_FILE = ".llmlab_optuna.lock"
_MAX_ERR = 4000


class SweepFailedError(HydraException):
    pass


def _plain(x: Any) -> Any:
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


class LlmlabOptunaSweeperImpl:
    def __init__(
        self,
        direction: Any,
        n_trials: int,
        n_jobs: int,
        study_name: str,
        storage: Optional[str],
        max_failures: Optional[int],
        retry_interrupted: bool,
        sampler: Any,
        params: Any,
    ) -> None:
        direction = _plain(direction)
        self.directions: List[str] = (
            [str(d).lower() for d in direction]
            if isinstance(direction, (list, tuple))
            else [str(direction).lower()]
        )
        for d in self.directions:
            if d not in ("minimize", "maximize"):
                raise SearchSpaceError(
                    f"llmlab_optuna: direction must be 'minimize' or 'maximize', got {d!r}"
                )
        if not isinstance(n_trials, int) or n_trials < 1:
            raise SearchSpaceError(f"llmlab_optuna: n_trials must be >= 1, got {n_trials!r}")
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise SearchSpaceError(f"llmlab_optuna: n_jobs must be >= 1, got {n_jobs!r}")
        if not study_name:
            raise SearchSpaceError("llmlab_optuna: study_name must be set")
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.study_name = str(study_name)
        self.storage_spec = storage
        self.max_failures = n_trials if max_failures is None else int(max_failures)
        self.retry_interrupted = bool(retry_interrupted)
        self.sampler_cfg = sampler
        self.params = _plain(params) or {}

        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None
        self.sweep_dir: Optional[Path] = None
        self._lock_fd: Optional[int] = None
        self._storage_desc = ""

    # ------------------------------------------------------------------ Hydra API
    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        assert self.sweep_dir is not None

        # 1. search space: every error here comes before any job, study or file.
        search, fixed = build_search_space(
            self.params, arguments, config_loader=self.hydra_context.config_loader
        )
        if not search:
            raise SearchSpaceError(
                "llmlab_optuna: nothing to search. Give hydra.sweeper.params or sweep overrides "
                "such as 'optim.lr=tag(log, interval(1e-5, 1e-3))'."
            )
        distributions = {}
        for p in search:
            try:
                distributions[p.name] = p.distribution()
            except ValueError as e:  # optuna's own checks, in case ours missed one
                raise SearchSpaceError(
                    f"llmlab_optuna: invalid search space for parameter '{p.name}': {e}"
                ) from e
        # The config must compose with the swept keys (typos, unknown groups) - fail fast.
        self._validate_batch([fixed + [p.override(p.representative()) for p in search]])

        log.info(
            "llmlab_optuna: study '%s', %s, %d trials planned, %d per batch; search space:\n%s",
            self.study_name, "/".join(self.directions), self.n_trials, self.n_jobs,
            "\n".join(f"  {p.name}: {p.describe()}" for p in search),
        )

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        # credentials (a storage URL's password, +*_api_key overrides) are masked on disk
        (self.sweep_dir / "multirun.yaml").write_text(redacted_yaml(self.config, resolve=False))
        self._acquire_lock()
        try:
            return self._run(search, fixed, distributions)
        finally:
            self._release_lock()

    # ------------------------------------------------------------------ internals
    def _validate_batch(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.hydra_context is not None and self.config is not None
        for overrides in batch:
            self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides)
            )

    def _acquire_lock(self) -> None:
        import fcntl

        assert self.sweep_dir is not None
        path = self.sweep_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise SweepFailedError(
                    f"llmlab_optuna: another sweeper process is running in {self.sweep_dir} "
                    f"(lock {path} is held). One sweeper per study."
                ) from e
            log.warning("llmlab_optuna: cannot lock %s (%s); going on without the lock", path, e)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open_storage(self) -> Any:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        assert self.sweep_dir is not None
        spec = self.storage_spec
        if spec and "://" in str(spec):
            self._storage_desc = redact_text(str(spec))  # logged and written: no password
            return str(spec)  # optuna builds the RDBStorage from the URL
        path = Path(spec) if spec else Path(DEFAULT_JOURNAL)
        if not path.is_absolute():
            path = self.sweep_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_journal(path)
        self._storage_desc = f"journal:{path}"
        _ = optuna  # keep the import for a clear error if optuna is missing
        return JournalStorage(JournalFileBackend(str(path)))

    def _make_sampler(self, n_existing: int) -> Any:
        from hydra.utils import instantiate

        cfg = _plain(self.sampler_cfg)
        if not cfg:
            import optuna

            return optuna.samplers.TPESampler()
        cfg = dict(cfg)
        if n_existing and cfg.get("seed") is not None:
            # A restarted sweep must not replay the random draws of the first start.
            cfg["seed"] = int(cfg["seed"]) + n_existing
        return instantiate(cfg)

    def _run(self, search: List[Param], fixed: List[str], distributions: Dict[str, Any]) -> Any:
        import optuna
        from optuna.trial import TrialState

        storage = self._open_storage()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            directions=self.directions,
            load_if_exists=True,
        )
        stored = [d.name.lower() for d in study.directions]
        if stored != self.directions:
            raise SweepFailedError(
                f"llmlab_optuna: study '{self.study_name}' in {self._storage_desc} has "
                f"direction(s) {stored}, the config says {self.directions}. Use another "
                f"study_name or storage."
            )
        existing = study.get_trials(deepcopy=False)
        study.sampler = self._make_sampler(len(existing))
        self._recover_interrupted(study)

        n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if existing:
            log.info(
                "llmlab_optuna: resuming study '%s' (%s): %d/%d trials complete",
                self.study_name, self._storage_desc, n_done, self.n_trials,
            )

        job_idx = 1 + max(
            [int(t.user_attrs.get("job_idx", -1)) for t in study.get_trials(deepcopy=False)],
            default=-1,
        )
        returns: List[Sequence[JobReturn]] = []
        failures = 0
        last_error = ""
        try:
            while True:
                n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                remaining = self.n_trials - n_done
                if remaining <= 0:
                    break
                if failures >= self.max_failures:
                    raise SweepFailedError(
                        f"llmlab_optuna: {failures} jobs failed in this run "
                        f"(max_failures={self.max_failures}); {n_done}/{self.n_trials} trials "
                        f"complete. Last error: {last_error}"
                    )
                k = min(self.n_jobs, remaining)
                trials = [study.ask(distributions) for _ in range(k)]
                batch: List[List[str]] = []
                for i, t in enumerate(trials):
                    overrides = fixed + [p.override(t.params[p.name]) for p in search]
                    t.set_user_attr("job_idx", job_idx + i)
                    t.set_user_attr("overrides", overrides)
                    batch.append(overrides)
                try:
                    self._validate_batch(batch)
                except Exception as e:
                    for t in trials:
                        self._fail(study, t, f"config composition failed: {_fmt_exc(e)}")
                    raise
                launch_error: Optional[BaseException] = None
                try:
                    results: Sequence[Optional[JobReturn]] = self.launcher.launch(
                        batch, initial_job_idx=job_idx
                    )
                except Exception as e:  # e.g. a Slurm job that died: the whole batch fails
                    launch_error = e
                    results = [None] * k
                    log.error("llmlab_optuna: launching the batch failed: %s", _fmt_exc(e))
                if launch_error is None:
                    returns.append(results)  # type: ignore[arg-type]
                for t, ret, overrides in zip(trials, results, batch):
                    if ret is not None and _job_dir(ret):
                        t.set_user_attr("job_dir", _job_dir(ret))
                    values, err = self._values_of(ret, launch_error)
                    if err is None:
                        study.tell(t, values if len(values) > 1 else values[0])
                        log.info(
                            "llmlab_optuna: trial %d [%s] -> %s",
                            t.number, " ".join(overrides),
                            values if len(values) > 1 else values[0],
                        )
                    else:
                        failures += 1
                        last_error = err.splitlines()[0] if err else err
                        self._fail(study, t, err)
                        log.warning(
                            "llmlab_optuna: trial %d [%s] FAILED: %s",
                            t.number, " ".join(overrides), last_error,
                        )
                job_idx += k
                self._write_results(study)
        finally:
            self._write_results(study)
        best = self._best_summary(study)
        log.info("llmlab_optuna: done. %s", best)
        return returns

    def _recover_interrupted(self, study: Any) -> None:
        from optuna.trial import TrialState

        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in running:
            retry = self.retry_interrupted and bool(t.params)
            msg = "interrupted: the sweeper stopped while this trial was running"
            study._storage.set_trial_user_attr(t._trial_id, "error", msg)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            if retry:
                study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            log.warning(
                "llmlab_optuna: trial %d was left RUNNING by an interrupted sweep: marked FAIL%s",
                t.number, ", its params will be tried again" if retry else "",
            )

    def _fail(self, study: Any, trial: Any, err: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("error", err[:_MAX_ERR])
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def _values_of(
        self, ret: Optional[JobReturn], launch_error: Optional[BaseException]
    ) -> "tuple[List[float], Optional[str]]":
        if ret is None:
            return [], f"launch failed: {_fmt_exc(launch_error)}" if launch_error else "no result"
        if ret.status == JobStatus.FAILED:
            exc = getattr(ret, "_return_value", None)
            return [], _fmt_exc(exc, with_tb=True) if exc is not None else "job failed"
        if ret.status != JobStatus.COMPLETED:
            return [], f"job status {ret.status}"
        value = ret.return_value
        if value is None:
            return [], "the task function returned None (it must return the metric to optimize)"
        raw = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        if len(raw) != len(self.directions):
            return [], (
                f"the task function returned {len(raw)} value(s) ({value!r}); "
                f"{len(self.directions)} direction(s) are configured"
            )
        values: List[float] = []
        for v in raw:
            try:
                f = float(v)
            except (TypeError, ValueError):
                return [], f"the task function returned a non-numeric value: {value!r}"
            if math.isnan(f):
                return [], _recorded_error(ret) or f"the task function returned NaN ({value!r})"
            values.append(f)
        return values, None

    # ------------------------------------------------------------------ results
    def _best_summary(self, study: Any) -> str:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return "no complete trial"
        if len(self.directions) == 1:
            b = study.best_trial
            return f"best trial {b.number}: value {b.value} params {b.params}"
        return f"{len(study.best_trials)} Pareto-optimal trials"

    def _write_results(self, study: Any) -> None:
        import yaml
        from optuna.trial import TrialState

        assert self.sweep_dir is not None
        trials = study.get_trials(deepcopy=False)
        by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
        res: Dict[str, Any] = {
            "name": "llmlab_optuna",
            "study_name": self.study_name,
            "storage": self._storage_desc,
            "direction": self.directions[0] if len(self.directions) == 1 else self.directions,
            "n_trials_planned": self.n_trials,
            "n_complete": len(by_state[TrialState.COMPLETE]),
            "n_failed": len(by_state[TrialState.FAIL]),
            "n_running": len(by_state[TrialState.RUNNING]),
            "n_waiting": len(by_state[TrialState.WAITING]),
            "finished": len(by_state[TrialState.COMPLETE]) >= self.n_trials,
        }
        if by_state[TrialState.COMPLETE]:
            if len(self.directions) == 1:
                b = study.best_trial
                res.update(
                    best_trial=b.number,
                    best_value=b.value,
                    best_params=dict(b.params),
                    best_overrides=b.user_attrs.get("overrides"),
                    best_job_dir=b.user_attrs.get("job_dir"),
                )
            else:
                res["best_trials"] = [
                    {"number": b.number, "values": list(b.values), "params": dict(b.params),
                     "job_dir": b.user_attrs.get("job_dir")}
                    for b in study.best_trials
                ]
        else:
            res.update(best_trial=None, best_value=None, best_params=None)
        res["trials"] = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": (t.values[0] if t.values and len(t.values) == 1 else
                          (list(t.values) if t.values else None)),
                "params": dict(t.params),
                "job_idx": t.user_attrs.get("job_idx"),
                "job_dir": t.user_attrs.get("job_dir"),
                **({"retry_of": t.user_attrs["retry_of"]} if "retry_of" in t.user_attrs else {}),
                **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
            }
            for t in trials
        ]
        path = self.sweep_dir / RESULTS_FILE
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(redact(res), sort_keys=False, default_flow_style=False))
        os.replace(tmp, path)


def _job_dir(ret: JobReturn) -> str:
    """The job's output dir (hydra.runtime.output_dir); the working dir only equals it with
    hydra.job.chdir=true."""
    try:
        out = ret.hydra_cfg.hydra.runtime.output_dir  # type: ignore[union-attr]
        if out:
            return str(out)
    except Exception:  # noqa: BLE001 - a JobReturn made by a launcher without hydra_cfg
        pass
    return str(ret.working_dir) if getattr(ret, "working_dir", None) else ""


def _recorded_error(ret: JobReturn) -> str:
    """The error a job recorded itself before returning NaN (llmlab.run writes summary.json with
    status: failed and error in its job dir, so that the sweep goes on)."""
    import json

    try:
        summary = json.loads((Path(_job_dir(ret)) / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        return ""
    if isinstance(summary, dict) and summary.get("status") == "failed" and summary.get("error"):
        return str(summary["error"])[:_MAX_ERR]
    return ""


def _fmt_exc(exc: Optional[BaseException], with_tb: bool = False) -> str:
    if exc is None:
        return ""
    head = f"{type(exc).__name__}: {exc}"
    if with_tb and exc.__traceback__ is not None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return head[:1000] + "\n" + tb[-(_MAX_ERR - 1100):]
    return head[:_MAX_ERR]


def _repair_journal(path: Path) -> None:
    """Make a journal file that a kill -9 may have left behind safe to append to.

    Optuna appends each record as one JSON line (write + fsync under a lock). A process killed in
    the middle of that write can leave a last line without its newline; Optuna skips such a line
    when reading, but the next append would be glued to it and corrupt the log. We hold the
    sweeper lock, so nobody else writes: cut the torn tail, and drop a lock file left behind.
    """
    lock = Path(str(path) + ".lock")
    if lock.exists() or lock.is_symlink():
        log.warning("llmlab_optuna: removing stale journal lock %s", lock)
        try:
            lock.unlink()
        except OSError:
            pass
    if not path.exists():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # find the last newline
        pos = size
        chunk = 4096
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        log.warning(
            "llmlab_optuna: journal %s ends with a torn record (%d bytes); cutting it",
            path, size - cut,
        )
        f.truncate(cut)
