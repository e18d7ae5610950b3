"""Against a real Slurm cluster (the local one from scripts/slurm_local.sh; CI starts it).

Skipped, with the reason, when `sinfo` is missing or no node is up. Jobs are tiny (bash, the toy
Hydra app); the llmlab-specific Slurm tests (DDP via the sbatch templates, preemption resume) live
with the training code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_helpers import job_info, jobs, partition, skip_without_cluster, wait_for  # noqa: F401 (jobs: fixture)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "fixtures" / "toy_app" / "app.py"

pytestmark = [pytest.mark.slurm, skip_without_cluster]
PARTITION = partition()


def _sbatch(*args: str, script: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def test_sbatch_two_tasks_with_srun(tmp_path, jobs, record_property):
    out = tmp_path / "out.txt"
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --partition={PARTITION}",
        "#SBATCH --ntasks=2",
        "#SBATCH --mem-per-cpu=200M",
        "#SBATCH --time=5",
        f"#SBATCH --output={out}",
        'echo "batch_start $(date +%s.%N)"',
        'srun bash -c \'echo "rank=$SLURM_PROCID of $SLURM_NTASKS"\'',
        "",
    ])
    t0 = time.time()
    jid = _sbatch(script=script)
    jobs.append(jid)
    wait_for(lambda: job_info(jid).get("JobState") == "COMPLETED", 120, "the job to complete", jid)
    text = out.read_text()
    ranks = sorted(re.findall(r"rank=(\d+) of (\d+)", text))
    assert ranks == [("0", "2"), ("1", "2")], text
    start = float(re.search(r"batch_start (\S+)", text).group(1))
    latency = start - t0
    record_property("sbatch_to_start_s", round(latency, 2))
    print(f"sbatch -> batch script start: {latency:.2f} s")
    assert latency < 60


def test_submitit_multirun_of_toy_app(tmp_path):
    """hydra/launcher=submitit_slurm: a 2-job multirun runs as 2 Slurm jobs and completes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = dict(os.environ, TOY_OUT=str(tmp_path), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(APP), "-m", "x=0.1,0.9",
           "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}",
           "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1"]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    print(f"2-job submitit multirun: {time.time() - t0:.1f} s")
    res = [json.loads((tmp_path / "sweep" / str(i) / "result.json").read_text()) for i in (0, 1)]
    assert [x["params"]["x"] for x in res] == [0.1, 0.9]
    assert all(x["slurm_job_id"] for x in res)
    assert res[0]["slurm_job_id"] != res[1]["slurm_job_id"]
    assert res[0]["value"] == pytest.approx((0.1 - 0.3) ** 2 + 0.25 + 0.08)


def test_optuna_sweeper_with_submitit_launcher(tmp_path):
    """The llmlab_optuna sweeper launching its batches as Slurm jobs (the real search setup)."""
    pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = dict(os.environ, TOY_OUT=str(tmp_path), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(APP), "-cn", "search", "-m",
           "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "fail_jobs=[1]",
           "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}",
           "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import yaml

    res = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert res["n_complete"] == 2 and res["n_failed"] == 1
    failed = [t for t in res["trials"] if t["state"] == "FAIL"]
    assert "failing on purpose" in failed[0]["error"]  # the exception came back from the Slurm job


def test_scontrol_requeue_restarts_a_running_job(tmp_path, jobs):
    marks = tmp_path / "starts.txt"
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --partition={PARTITION}",
        "#SBATCH --ntasks=1",
        "#SBATCH --mem-per-cpu=200M",
        "#SBATCH --time=5",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/job.out",
        f'echo "start $SLURM_JOB_ID ${{SLURM_RESTART_COUNT:-0}}" >> {marks}',
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi',
        "",
    ])
    jid = _sbatch(script=script)
    jobs.append(jid)
    wait_for(lambda: marks.exists() and "start" in marks.read_text(), 60, "the job to start", jid)
    assert job_info(jid).get("JobState") == "RUNNING"
    t0 = time.time()
    r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # cred_expire (slurm.conf AuthInfo) delays the restart: 10 s locally, 120 s by default
    wait_for(lambda: job_info(jid).get("JobState") == "COMPLETED", 240, "the requeued job to finish", jid,
          poll=0.5)
    print(f"scontrol requeue -> requeued job finished: {time.time() - t0:.1f} s")
    lines = marks.read_text().split("\n")
    assert [ln for ln in lines if ln] == [f"start {jid} 0", f"start {jid} 1"]
    assert job_info(jid).get("Restarts") == "1"


SIG_TASK = r"""
import os, signal, subprocess, sys, time
rc = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
rank = os.environ["SLURM_PROCID"]
marks = sys.argv[1]
with open(marks, "a") as f:
    f.write(f"start rank={rank} restart={rc}\n")
if rc > 0:
    sys.exit(0)
def on_usr1(signum, frame):  # what Lightning's SLURMEnvironment does: checkpoint, then requeue
    with open(marks, "a") as f:
        f.write(f"usr1 rank={rank}\n")
    if rank == "0":
        subprocess.call(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
signal.signal(signal.SIGUSR1, on_usr1)
while True:
    time.sleep(0.2)
"""


@pytest.mark.slow
def test_time_limit_signal_reaches_srun_tasks_and_requeues(tmp_path, jobs):
    """--signal=SIGUSR1@50 with --time=1: every srun task gets SIGUSR1 before the limit; the
    handler's `scontrol requeue` brings the job back with the same id (the templates' flow)."""
    task = tmp_path / "task.py"
    task.write_text(SIG_TASK)
    marks = tmp_path / "marks.txt"
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --partition={PARTITION}",
        "#SBATCH --ntasks=2",
        "#SBATCH --mem-per-cpu=200M",
        "#SBATCH --time=1",
        "#SBATCH --signal=SIGUSR1@50",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/job.out",
        f"srun {sys.executable} {task} {marks}",
        "",
    ])
    t0 = time.time()
    jid = _sbatch(script=script)
    jobs.append(jid)
    wait_for(lambda: job_info(jid).get("JobState") == "COMPLETED" and job_info(jid).get("Restarts") == "1",
          240, "the signalled job to requeue and finish", jid, poll=0.5)
    print(f"--time=1 --signal=USR1@50: submit -> requeued run finished: {time.time() - t0:.1f} s")
    lines = sorted(ln for ln in marks.read_text().splitlines() if ln)
    assert lines == sorted([
        "start rank=0 restart=0", "start rank=1 restart=0",
        "usr1 rank=0", "usr1 rank=1",
        "start rank=0 restart=1", "start rank=1 restart=1",
    ]), lines
