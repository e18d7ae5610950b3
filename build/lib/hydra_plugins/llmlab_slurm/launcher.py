"""`LlmlabSlurmLauncher`: every sweep job becomes a Slurm job (hydra-submitit-launcher underneath).

What it adds to hydra-submitit-launcher's `SlurmLauncher`:

* **A clear error before anything is submitted** when `sbatch` is not on the PATH, or when a resource
  is not a number (`trainer.devices=auto` cannot be a count of srun tasks).
* **Per-job resources.** `hydra.launcher` is resolved against each job's own config, so
  `-m trainer.devices=1,2` submits a 1-task and a 2-task job (upstream resolves it once for the
  whole sweep). Jobs with the same resources share one job array.
* **Preemption through Lightning.** Slurm sends `signal` (default SIGUSR1) `signal_delay_s` before
  the time limit to every task; Lightning's SLURMEnvironment checkpoints on every rank
  (`<job dir>/hpc_ckpt_<n>.ckpt`) and requeues the job, and the requeued job (same job dir,
  `resume=auto`) resumes from it. With `signal: USR2` submitit's own handler requeues instead and
  the job resumes from its last periodic `last.ckpt`.
* **A job Slurm killed is a failed job, not a failed sweep.** (Out of memory, cancelled, node failure:
  submitit raises when its result is read, and upstream then stops the whole sweep.) Its job dir gets
  `summary.json` with `status: failed` and the error, as for a job that raised inside Python, and
  the sweep goes on; every job is waited for.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from llmlab.redact import redact_text

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Base
except ImportError:  # pragma: no cover - the optional `slurm` extra is not installed
    from hydra.plugins.launcher import Launcher as _Base

log = logging.getLogger(__name__)

SUBMITIT_INIT_KEYS = {"submitit_folder", "max_num_timeout"}
OUR_KEYS = {"accelerator", "signal"}
NO_SBATCH = ("launcher=slurm submits every sweep job with `sbatch`, which is not on the PATH. "
             "Run the sweep where Slurm's commands are (a login node; `module load slurm` on some "
             "clusters), start a local test cluster (sudo scripts/slurm_local.sh), or run the sweep on "
             "this machine with launcher=local.")


class SlurmLauncherError(CompactHydraException):
    """A launcher setting that cannot work; the message names the override to change."""


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise SlurmLauncherError(NO_SBATCH)


def _count(params: Dict[str, Any], key: str, source: str, allow_none: bool = False) -> Optional[int]:
    value = params.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_none else 1):
        raise SlurmLauncherError(
            f"launcher=slurm: hydra.launcher.{key} must be a whole number{'' if allow_none else ' >= 1'}, got "
            f"{value!r} (from {source}). Give it explicitly, e.g. {source}=2.")
    return value


def resolve_job_params(launcher_cfg: DictConfig) -> Dict[str, Any]:
    """The submitit parameters of one job from its resolved `hydra.launcher` node, checked."""
    params = OmegaConf.to_container(launcher_cfg, resolve=True)
    assert isinstance(params, dict)
    params.pop("_target_", None)
    _count(params, "tasks_per_node", "trainer.devices")
    _count(params, "nodes", "trainer.num_nodes")
    _count(params, "timeout_min", "slurm.time_min")
    _count(params, "cpus_per_task", "slurm.cpus_per_task", allow_none=True)
    accelerator = str(params.pop("accelerator", None) or "").lower()
    if params.get("gpus_per_node") == "auto":
        params["gpus_per_node"] = params["tasks_per_node"] if accelerator in ("gpu", "cuda") else None
    _count(params, "gpus_per_node", "slurm.gpus_per_node", allow_none=True)
    if params.get("mem_gb") is not None and not isinstance(params["mem_gb"], (int, float)):
        raise SlurmLauncherError(f"launcher=slurm: slurm.mem_gb must be a number of GB, got {params['mem_gb']!r}")
    # Slurm's warning signal: ours (USR1 -> Lightning) unless the user set --signal themselves
    signal = str(params.pop("signal", "USR1") or "USR1").upper().removeprefix("SIG")
    extra = dict(params.get("additional_parameters") or {})
    extra.setdefault("signal", f"{signal}@{int(params.get('signal_delay_s', 120))}")
    extra.setdefault("requeue", True)  # clusters with JobRequeue=0 refuse `scontrol requeue` otherwise
    params["additional_parameters"] = extra
    return params


# Slurm states after which no result will come (PREEMPTED: only if the job is not requeued soon after)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def _slurm_states(job_ids: List[str]) -> Optional[Dict[str, str]]:
    """{job id (array tasks as <id>_<n>): state} from squeue (ended jobs stay listed for MinJobAge; a
    job missing from the answer ended long ago); None when squeue does not answer."""
    base = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(base)],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        return None
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


def wait_for_jobs(jobs: List[Any], grace_s: float = 30.0, poll_s: float = 2.0) -> List[Optional[str]]:
    """Wait until every job has written its result file, or has ended in Slurm without one.

    submitit alone waits forever for a job that was killed before writing its result when `sacct` does
    not work (clusters without accounting: its state then reads UNKNOWN). Here squeue decides: a job
    that Slurm lists as ended (or no longer lists) and has no result file `grace_s` later has failed.
    Returns, per job, None (result written) or the Slurm state it ended in.
    """
    import time

    ended: List[Optional[str]] = [None] * len(jobs)
    waiting = {i for i, job in enumerate(jobs) if not job.paths.result_pickle.exists()}
    since: Dict[int, float] = {}
    while waiting:
        time.sleep(poll_s)
        states = _slurm_states([str(jobs[i].job_id) for i in waiting])
        for i in sorted(waiting):
            job = jobs[i]
            if job.paths.result_pickle.exists():
                waiting.discard(i)
                continue
            state = None if states is None else states.get(str(job.job_id), "PURGED")
            if state is None or (state not in TERMINAL and state != "PURGED"):
                since.pop(i, None)  # pending, running, requeued, or squeue did not answer
                continue
            # a result file may show up late on a network file system; a killed job writes none
            limit = {"PREEMPTED": 10 * grace_s, "COMPLETED": grace_s, "FAILED": grace_s,
                     "PURGED": grace_s}.get(state, grace_s / 3)
            if time.time() - since.setdefault(i, time.time()) > limit:
                ended[i] = state
                waiting.discard(i)
    return ended


class LlmlabSlurmLauncher(_Base):  # type: ignore[misc, valid-type]
    def __init__(self, **params: Any) -> None:
        if _Base.__name__ != "SlurmLauncher":
            raise SlurmLauncherError("launcher=slurm needs hydra-submitit-launcher: pip install 'llmlab[slurm]'")
        super().__init__(**params)

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        require_sbatch()  # before the sweeper asks for a single job
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        resolve_job_params(config.hydra.launcher)  # settings every job shares fail here, not per job

    def _executor(self, params: Dict[str, Any]) -> Any:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                         slurm_max_num_timeout=params.get("max_num_timeout", 3))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            (k if k in base else f"slurm_{k}"): v for k, v in params.items()
            if k not in SUBMITIT_INIT_KEYS and v is not None})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        require_sbatch()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)

        # 1. every job's resources from its own config; equal resources -> one job array
        groups: Dict[str, Any] = {}
        job_dirs: List[Path] = []
        for i, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = initial_job_idx + i
            job_dirs.append(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
            params = resolve_job_params(cfg.hydra.launcher)
            key = json.dumps(params, sort_keys=True, default=str)
            groups.setdefault(key, (params, []))[1].append(i)

        # 2. submit
        jobs: List[Any] = [None] * len(job_overrides)
        for params, members in groups.values():
            executor = self._executor(params)
            args = [(list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i,
                     f"job_id_for_{initial_job_idx + i}", Singleton.get_state()) for i in members]
            submitted = executor.map_array(self, *zip(*args))
            for i, job in zip(members, submitted):
                jobs[i] = job
                log.info("\t#%d : %s -> Slurm job %s (%d node(s) x %d task(s)%s)", initial_job_idx + i,
                         redact_text(" ".join(filter_overrides(job_overrides[i]))), job.job_id, params["nodes"],
                         params["tasks_per_node"],
                         f", {params['gpus_per_node']} GPU(s)/node" if params.get("gpus_per_node") else "")

        # 3. wait for every job; one that Slurm killed is recorded as failed, the sweep goes on
        ended = wait_for_jobs(jobs)
        results: List[JobReturn] = []
        for i, job in enumerate(jobs):
            try:
                if ended[i] is not None:  # no result file: killed, cancelled, out of memory, node failure
                    raise RuntimeError(f"Slurm state {ended[i]}, no result written (see {job.paths.stderr})")
                results.append(job.task(0).result())
            except Exception as err:  # noqa: BLE001 - submitit's UncompletedJobError/FailedJobError, ...
                results.append(self._failed(job, job_overrides[i], job_dirs[i], err))
        return results

    def _failed(self, job: Any, overrides: Sequence[str], job_dir: Path, err: BaseException) -> JobReturn:
        """A job that ended without a result (killed, out of memory, node failure)."""
        first = str(err).strip().splitlines()
        message = redact_text(f"Slurm job {job.job_id} ended without a result: {type(err).__name__}: "
                              f"{first[0] if first else ''}")
        log.error("%s (log: %s)", message, getattr(job.paths, "stderr", "?"))
        summary_path = job_dir / "summary.json"
        summary: Dict[str, Any] = {}
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except ValueError:
                summary = {}
        if summary.get("status") != "finished":  # keep what the job itself recorded when it finished
            summary.update(status="failed", error=message, slurm_job_id=str(job.job_id),
                           slurm_log=str(getattr(job.paths, "stderr", "")), run_dir=str(job_dir))
            job_dir.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            (job_dir / "error.txt").write_text(f"{message}\n\n{redact_text(str(err))}\n")
        metric = self.config.get("optimized_metric") if self.config is not None else None
        value = summary.get(metric) if metric and summary.get("status") == "finished" else None
        return JobReturn(overrides=list(overrides), working_dir=str(job_dir), status=JobStatus.COMPLETED,
                         _return_value=float(value) if isinstance(value, (int, float)) else math.nan)
