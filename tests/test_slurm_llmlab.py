"""llmlab on a real Slurm cluster (the local one from scripts/slurm_local.sh; CI starts it).

- slurm/single_node.sbatch runs a 2-task DDP job through srun (Lightning's SLURMEnvironment ranks);
- `-m launcher=slurm` runs a sweep as Slurm jobs, each with its own resources (trainer.devices=1,2);
- preemption: SIGUSR1 (what Slurm sends before the time limit) -> Lightning checkpoints and requeues ->
  the job resumes from hpc_ckpt_N.ckpt; `scontrol requeue` of a sweep job -> resumes from last.ckpt;
  either way history.json has every optimizer step exactly once. A sweep job cancelled in Slurm is
  recorded as failed and the sweep completes.
Skipped, with the reason, when there is no usable cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT
from tests.slurm_helpers import job_info, jobs, skip_without_cluster, wait_for  # noqa: F401 (jobs: fixture)

pytestmark = [pytest.mark.slurm, skip_without_cluster]
TINY = [*FAST, "callbacks.samples=null", "callbacks.hf_export=null"]


def tiny(**changes) -> list[str]:
    return [o for o in TINY if o.split("=")[0] not in changes] + [f"{k}={v}" for k, v in changes.items()]


def wait_done(jid: str, timeout: float) -> dict:
    def done():
        info = job_info(jid)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                                "NODE_FAIL") else None
    return wait_for(done, timeout, f"Slurm job {jid} to end", jid=jid, poll=0.5)


def task_pid(jid: str, rank: int) -> int:
    """The pid of global task `rank` of the job's srun step (python itself: srun starts it directly)."""
    def pid():
        out = subprocess.run(["scontrol", "listpids", jid], capture_output=True, text=True).stdout
        # PID JOBID STEPID LOCALID GLOBALID; the batch shell's own step has no task ids ("-")
        rows = [line.split() for line in out.splitlines()[1:]]
        return next((int(r[0]) for r in rows if len(r) == 5 and r[2].isdigit() and r[4] == str(rank)), None)
    return wait_for(pid, 30, f"task {rank} of job {jid}", jid=jid)


def slurm_job_dirs(sweep: Path) -> list[str]:
    """Slurm job ids of a launcher=slurm sweep (submitit keeps one dir per job in .submitit/)."""
    root = sweep / ".submitit"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def train_steps(run_dir: Path) -> list[int]:
    return [step for step, _ in json.loads((run_dir / "history.json").read_text())["train/loss"]]


def sbatch_template(tmp_path: Path, *overrides: str, time_min: int = 10) -> str:
    env = {**os.environ, "LLMLAB_PYTHON": sys.executable, "LLMLAB_LOG_DIR": str(tmp_path)}
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=3G",
                        f"--time={time_min}", f"--output={tmp_path}/slurm-%j.out",
                        str(ROOT / "slurm" / "single_node.sbatch"), *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def test_sbatch_template_runs_two_task_ddp_job(tmp_path, jobs):
    jid = sbatch_template(tmp_path, "strategy=ddp", *tiny())
    jobs.append(jid)
    info = wait_done(jid, 240)
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run_dir = tmp_path / "slurm" / f"llmlab-{jid}"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["world_size"] == 2 and s["strategy"] == "ddp" and s["global_step"] == 6
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert train_steps(run_dir) == list(range(1, 7))


def test_launcher_slurm_sweep_with_per_job_devices_and_report(tmp_path):
    """`-m launcher=slurm trainer.devices=1,2`: a 1-task and a 2-task Slurm job; the report lists both."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "llmlab.run", "-m", "launcher=slurm", "slurm.time_min=10",
                        "slurm.mem_gb=3", "strategy=ddp", "trainer.devices=1,2", *tiny(),
                        f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr + r.stdout
    assert re.search(r"#0 : [^\n]*trainer.devices=1 [^\n]*-> Slurm job \S+ \(1 node\(s\) x 1 task\(s\)\)", log)
    assert re.search(r"#1 : [^\n]*trainer.devices=2 [^\n]*-> Slurm job \S+ \(1 node\(s\) x 2 task\(s\)\)", log)
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [(s["status"], s["world_size"]) for s in summaries] == [("finished", 1), ("finished", 2)]
    assert len(slurm_job_dirs(sweep)) == 2  # two Slurm jobs
    rep = subprocess.run([sys.executable, "-m", "llmlab.report", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "2 jobs: 2 finished" in rep.stdout
    assert re.search(r"\| (\*\*)?0(\*\* ★)? \| finished \| 1 \|", rep.stdout)
    assert re.search(r"\| (\*\*)?1(\*\* ★)? \| finished \| 2 \|", rep.stdout)
    assert (sweep / "report.png").exists()


@pytest.mark.parametrize("to", ["every_rank", "rank_1_only"])
def test_sigusr1_checkpoints_requeues_and_resumes_without_losing_a_step(tmp_path, jobs, to):
    """What happens at the time limit (--signal=SIGUSR1@90), sent now: every rank checkpoints
    (hpc_ckpt_1.ckpt) at the next step boundary, rank 0 requeues, the job comes back and resumes from it.
    every_rank: `scancel --signal=USR1`, as Slurm sends it. rank_1_only: the ranks take the signal at
    different moments, the extreme case; Lightning's own handler checkpoints inside the signal handler and
    deadlocks here (one rank in the checkpoint's collectives, the other in the gradient all-reduce)."""
    steps = 60
    jid = sbatch_template(tmp_path, "strategy=ddp",
                          *tiny(**{"trainer.max_steps": steps, "trainer.val_check_interval": 10,
                                   "trainer.limit_val_batches": 1}))
    jobs.append(jid)
    run_dir = tmp_path / "slurm" / f"llmlab-{jid}"
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 180, "the first periodic checkpoint", jid=jid)
    time.sleep(1.0)
    if to == "every_rank":
        subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # to the srun tasks (python), not the shell
    else:
        os.kill(task_pid(jid, 1), signal.SIGUSR1)
    info = wait_done(jid, 300)
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "1"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert "Slurm time-limit signal: checkpoint " + str(hpc) in log and f"Requeued Slurm job {jid}" in log, log[-3000:]
    assert "Handling auto-requeue signal" not in log  # Lightning's in-handler checkpoint stays out
    assert hpc.is_file()
    # resume=auto takes the newer of hpc_ckpt_1.ckpt (written at the signal) and checkpoints/last.ckpt:
    # training goes on until Slurm stops the job, so a periodic last.ckpt can come after the signal's
    restored = re.search(r"Restoring states from the checkpoint path at (\S+)", log)
    assert restored and restored.group(1) in (str(hpc), str(run_dir / "checkpoints" / "last.ckpt")), log[-3000:]
    import torch

    resumed_at = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 10 <= resumed_at < steps  # (last.ckpt, if that was the newer one, now holds the final step)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == steps and s["world_size"] == 2
    assert train_steps(run_dir) == list(range(1, steps + 1))  # every step once, across the requeue


def test_sweep_job_requeued_resumes_and_cancelled_job_is_recorded(tmp_path):
    """A 2-job launcher=slurm sweep: job 0 is requeued by Slurm (`scontrol requeue`: SIGTERM, no
    checkpoint at the signal) and resumes from its last.ckpt; job 1 is cancelled (scancel) and recorded
    as failed; the sweep completes and the report shows both."""
    steps = 60
    sweep = tmp_path / "sweep"
    # job 1 is given far more steps than it can run before the scancel: with equal step counts it could
    # finish first (it starts before job 0 when Slurm picks it first) and be, rightly, recorded as finished
    cmd = [sys.executable, "-m", "llmlab.run", "-m", "launcher=slurm", "slurm.time_min=10", "slurm.mem_gb=3",
           f"hydra.sweep.dir={sweep}",
           *tiny(**{"trainer.max_steps": f"{steps},100000", "trainer.val_check_interval": 10,
                    "trainer.limit_val_batches": 1})]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (sweep / "0" / "checkpoints" / "last.ckpt").exists(), 240, "job 0's first checkpoint")
        def slurm_id(i):  # which Slurm job is sweep job i
            hydra_yaml = sweep / str(i) / ".hydra" / "hydra.yaml"
            wait_for(hydra_yaml.exists, 120, f"job {i} to start")
            return re.search(r"\n    id: '?([0-9_]+)", hydra_yaml.read_text()).group(1)

        # job 0 is requeued as soon as its first checkpoint is there, long before its last step
        hydra_ids = {0: slurm_id(0)}
        subprocess.run(["scontrol", "requeue", hydra_ids[0]], check=True)
        hydra_ids[1] = slurm_id(1)
        subprocess.run(["scancel", hydra_ids[1]], check=True)
        # equal resources: one job array, tasks 0 and 1
        array = hydra_ids[0].split("_")[0]
        assert hydra_ids == {0: f"{array}_0", 1: f"{array}_1"}
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--name", "llmlab-pretrain"], capture_output=True)
    assert proc.returncode == 0, out[-3000:]
    s0 = json.loads((sweep / "0" / "summary.json").read_text())
    s1 = json.loads((sweep / "1" / "summary.json").read_text())
    assert s0["status"] == "finished" and s0["global_step"] == steps
    assert train_steps(sweep / "0") == list(range(1, steps + 1))
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / hydra_ids[0]).glob("*_log.*"))
    assert f"Restoring states from the checkpoint path at {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in logs
    assert s1["status"] == "failed" and f"Slurm job {hydra_ids[1]} ended without a result" in s1["error"]
    from llmlab.report import report

    rep = report(sweep)
    assert [(j.name, j.status) for j in rep["jobs"]] == [("0", "finished"), ("1", "failed")]
    assert rep["best"].name == "0"
