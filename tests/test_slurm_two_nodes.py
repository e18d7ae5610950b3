"""llmlab on a real two-node Slurm cluster on this one machine: nodes node1 and node2 of partition `multi`,
each a slurmd in its own network namespace, with its own address (10.77.0.11/.12) and hostname
(`sudo scripts/slurm_local.sh start --nodes 2`; scripts/test.sh starts it for CI). A job's two processes
can only talk over those addresses: the namespaces share no loopback.

- slurm/multi_node.sbatch, 2 nodes x 1 task: DDP and ZeRO-2 losses equal the same run as 2 processes on
  one node (no Slurm);
- SIGUSR1 (scancel --signal=USR1 to both nodes; or to node2's task only) -> checkpoint on both nodes ->
  requeue -> resume, every step once;
- `-m launcher=slurm trainer.num_nodes=2`: a submitit job on both nodes;
- torchrun with c10d rendezvous on node1, one agent per node (started by srun);
- node2 dies mid-run (link down, every process in its namespace SIGKILLed): the job ends within Slurm's
  node-failure bound (SlurmdTimeout + one ping interval), not the collective timeout, is requeued, and
  resumes from its last checkpoint when the node is back;
- a rank that hangs (SIGSTOP; its node stays up): `strategy.timeout_minutes` bounds the job, and a
  re-submitted job with the same run dir resumes from the last checkpoint.
Skipped, with the reason, when the two-node cluster is not running.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm_helpers import job_info, jobs, skip_without_two_nodes, wait_for  # noqa: F401 (jobs: fixture)
from tests.support_matrix import launch

pytestmark = [pytest.mark.slurm, skip_without_two_nodes]
PARTITION = os.environ.get("LLMLAB_SLURM_MULTI_PARTITION", "multi")
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
# the tiny GPT-2 (2 layers, 32 wide), fp32; 4 samples per process, 2 processes = 8 per optimizer step
TINY = ["stage=pretrain", "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "trainer.max_steps=6",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        "data.n_train=200", "data.n_val=8", "data.batch_size=4", "callbacks.samples=null", "callbacks.hf_export=null"]
REL = 1e-5  # measured: bit-identical (DDP and ZeRO-2, 2 nodes vs 1 node)


def tiny(**changes) -> list[str]:
    return [o for o in TINY if o.split("=")[0] not in changes] + [f"{k}={v}" for k, v in changes.items()]


# long enough to be hit mid-run: a periodic last.ckpt every 20 steps, 200 steps
LONG = {"trainer.max_steps": 200, "trainer.val_check_interval": 20, "trainer.limit_val_batches": 1,
        "data.n_train": 2000}


_REFERENCE: dict[str, list[float]] = {}


def one_node_losses(tmp_root: Path, strategy: str) -> list[float]:
    """train/loss per step of the same run as 2 processes on one node (Lightning's launcher, no Slurm)."""
    if strategy not in _REFERENCE:
        r = launch(tmp_root / f"one_node_{strategy}", [*tiny(), f"strategy={strategy}", "trainer.accelerator=cpu",
                                                       "trainer.devices=2"])
        assert r.ok, r.describe()
        _REFERENCE[strategy] = losses(r.run_dir)
    return _REFERENCE[strategy]


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("one_node")


def losses(run_dir: Path) -> list[float]:
    points = json.loads((run_dir / "history.json").read_text())["train/loss"]
    assert [s for s, _ in points] == list(range(1, len(points) + 1)), points  # each step once
    return [v for _, v in points]


def assert_close(actual: list[float], expected: list[float], rel: float = REL) -> None:
    assert len(actual) == len(expected) > 0, (actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert math.isclose(a, e, rel_tol=rel), f"step {step}: {a} vs {e}\n{actual}\n{expected}"


def sbatch_multi(tmp_path: Path, *overrides: str, run_dir: Path | None = None, time_min: int = 10) -> str:
    """slurm/multi_node.sbatch on node1 + node2, one CPU task each."""
    env = {**os.environ, "LLMLAB_PYTHON": sys.executable, "LLMLAB_LOG_DIR": str(tmp_path)}
    if run_dir:
        env["LLMLAB_RUN_DIR"] = str(run_dir)
    r = subprocess.run(["sbatch", "--parsable", f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=1",
                        "--gpus-per-node=0", "--cpus-per-task=1", "--mem=3G", f"--time={time_min}",
                        f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "multi_node.sbatch"), *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_done(jid: str, timeout: float) -> dict:
    return wait_for(lambda: (i := job_info(jid)).get("JobState") in ENDED and i, timeout,
                    f"Slurm job {jid} to end", jid=jid, poll=0.5)


def task_pid(jid: str, rank: int) -> int:
    """pid of the job's global task `rank` (python, started by srun), found by its environment in /proc:
    `scontrol listpids` only sees the node it runs on."""
    def find():
        found: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            try:
                argv = (d / "cmdline").read_text().split("\0") if d.name.isdigit() else []
                if not (argv and Path(argv[0]).name.startswith("python") and "llmlab.run" in argv):
                    continue  # (srun's own command line names llmlab.run too)
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                parent = int(stat_fields(int(d.name))[1])
            except OSError:
                continue
            if env.get("SLURM_JOB_ID") == jid and env.get("SLURM_PROCID") == str(rank):
                found[int(d.name)] = parent
        # the task itself, not a process it started with the same command line and environment
        return next((p for p, parent in found.items() if parent not in found), None)
    return wait_for(find, 60, f"task {rank} of job {jid}", jid=jid, poll=0.5)


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent pid, ... (OSError once it is gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str:
    """R, S, T (stopped), ...; "" once it is gone."""
    try:
        return stat_fields(pid)[0]
    except OSError:
        return ""


def netns_of(pid: int) -> str:
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()


def ckpt_step(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_multi_node_sbatch_equals_one_node(tmp_path, jobs, ref_root, strategy):
    """2 nodes x 1 task through slurm/multi_node.sbatch == 2 processes on one node, step for step."""
    jid = sbatch_multi(tmp_path, f"strategy={strategy}", *tiny())
    jobs.append(jid)
    info = wait_done(jid, 300)
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "2 node(s) x 1 x cpu (node[1-2])" in log, log[-3000:]
    run_dir = tmp_path / "slurm" / f"llmlab-{jid}"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["world_size"] == 2 and s["global_step"] == 6
    two, one = losses(run_dir), one_node_losses(ref_root, strategy)
    print(f"{strategy}: 2 nodes x 1 {[round(v, 6) for v in two]}\n{strategy}: 1 node x 2  {[round(v, 6) for v in one]}"
          f"\n{strategy}: max relative difference {max(abs(a - b) / abs(b) for a, b in zip(two, one)):.1e}")
    assert_close(two, one)


@pytest.mark.parametrize("to", ["scancel", "node2_only"])
def test_sigusr1_checkpoints_requeues_and_resumes_on_two_nodes(tmp_path, jobs, to):
    """scancel: `scancel --signal=USR1 <job>`, as Slurm sends it at the time limit, to the tasks on both nodes.
    node2_only: SIGUSR1 to node2's task (rank 1) alone (scancel cannot pick one node's task). Either way the
    ranks agree at the next step boundary, both nodes write their part of hpc_ckpt_1.ckpt, rank 0 (node1)
    requeues; the job comes back on both nodes and resumes."""
    steps = LONG["trainer.max_steps"]
    jid = sbatch_multi(tmp_path, "strategy=ddp", *tiny(**LONG))
    jobs.append(jid)
    run_dir = tmp_path / "slurm" / f"llmlab-{jid}"
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 240, "the first periodic checkpoint", jid=jid)
    pid = task_pid(jid, 1)
    assert netns_of(pid) == "llmlab-node2"
    if to == "scancel":
        subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # to the srun tasks, not the batch shell
    else:
        os.kill(pid, signal.SIGUSR1)
    info = wait_done(jid, 400)
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"Slurm time-limit signal: checkpoint {hpc}" in log and f"Requeued Slurm job {jid}" in log, log[-3000:]
    assert "restart 1 from node1" in log
    restored = re.search(r"Restoring states from the checkpoint path at (\S+)", log)
    assert restored and restored.group(1) in (str(hpc), str(run_dir / "checkpoints" / "last.ckpt")), log[-3000:]
    assert 20 <= ckpt_step(hpc) < steps
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == steps and s["world_size"] == 2
    losses(run_dir)  # every step 1..steps exactly once across the requeue
    assert len(losses(run_dir)) == steps


def test_launcher_slurm_job_on_two_nodes(tmp_path, ref_root):
    """`-m launcher=slurm trainer.num_nodes=2 trainer.devices=1`: one submitit job on node1 + node2."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "llmlab.run", "-m", "launcher=slurm", f"slurm.partition={PARTITION}",
                        "slurm.time_min=10", "slurm.mem_gb=3", "trainer.num_nodes=2", "trainer.devices=1",
                        "strategy=ddp", *tiny(), f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"#0 : [^\n]*-> Slurm job \S+ \(2 node\(s\) x 1 task\(s\)\)", r.stderr + r.stdout)
    s = json.loads((sweep / "0" / "summary.json").read_text())
    assert s["status"] == "finished" and s["world_size"] == 2
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    hosts = sorted(re.findall(r"JobEnvironment\(job_id=\S+, hostname=(\w+), local_rank=0\(1\), node=(\d)\(2\)", logs))
    assert hosts == [("node1", "0"), ("node2", "1")], logs[-2000:]
    assert_close(losses(sweep / "0"), one_node_losses(ref_root, "ddp"))


def test_torchrun_c10d_rendezvous_across_the_namespaces(tmp_path, ref_root):
    """One torchrun agent per node (srun), c10d rendezvous at node1:<port>; Slurm's variables are unset for
    torchrun, or Lightning would take its ranks from Slurm (SLURM_PROCID) instead of torchrun's."""
    run_dir = tmp_path / "torchrun"
    port = 29400 + os.getpid() % 500
    overrides = " ".join([*tiny(), "strategy=ddp", "trainer.num_nodes=2", "trainer.devices=1",
                          f"hydra.run.dir={run_dir}"])
    agent = (f'unset ${{!SLURM_@}}; echo "agent on $(hostname) $(hostname -i)"; '
             f"exec {sys.executable} -m torch.distributed.run --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d "
             f"--rdzv-endpoint=node1:{port} --rdzv-id=llmlab-{os.getpid()} -m llmlab.run {overrides}")
    r = subprocess.run(["srun", f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=1", "--mem=3G",
                        "--time=10", "--kill-on-bad-exit=1", "bash", "-c", agent],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    subnet = os.environ.get("LLMLAB_SLURM_SUBNET", "10.77.0")
    assert sorted(re.findall(r"agent on (\S+) (\S+)", out)) == [("node1", f"{subnet}.11"), ("node2", f"{subnet}.12")], \
        out[-2000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["world_size"] == 2
    assert_close(losses(run_dir), one_node_losses(ref_root, "ddp"))


def slurmd_timeout() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return int(re.search(r"SlurmdTimeout\s*=\s*(\d+)", out).group(1))


@pytest.fixture
def node2_revived():
    """Whatever a test does to node2, it is alive again at the end."""
    yield
    subprocess.run(["bash", str(SCRIPT), "revive-node", "node2"], capture_output=True, text=True, timeout=60)
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True,
                                    text=True).stdout.strip().rstrip("*") in ("idle", "mixed", "allocated"),
             120, "node2 to return to service")


def test_dead_node_ends_the_job_in_bounded_time_and_requeued_job_resumes(tmp_path, jobs, node2_revived,
                                                                        record_property):
    """node2 dies mid-run (`slurm_local.sh kill-node node2`: its link goes down first, so no FIN/RST reaches
    node1, then every process in its namespace, slurmd included, gets SIGKILL). node1's rank waits in the
    gradient all-reduce; Slurm marks node2 DOWN after SlurmdTimeout, ends the job (NODE_FAIL) and requeues it
    (--requeue). The collective timeout (strategy.timeout_minutes, 30 by default) plays no part. When node2
    is back the job starts again and resumes from its last periodic checkpoint; every step is in history once."""
    steps = LONG["trainer.max_steps"]
    jid = sbatch_multi(tmp_path, "strategy=ddp", *tiny(**LONG))
    jobs.append(jid)
    run_dir = tmp_path / "slurm" / f"llmlab-{jid}"
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 240, "the first periodic checkpoint", jid=jid)
    r = subprocess.run(["bash", str(SCRIPT), "kill-node", "node2"], capture_output=True, text=True, timeout=60)
    t_kill = time.time()
    assert r.returncode == 0, r.stderr
    bound = slurmd_timeout() * 4 / 3 + 30  # DOWN after SlurmdTimeout, noticed at a ping (every SlurmdTimeout/3)
    info = wait_for(lambda: ((i := job_info(jid)).get("Restarts") == "1" or i.get("JobState") in ENDED) and i, bound,
                    "the job to end and be requeued", jid=jid, poll=0.5)
    t_fail = time.time() - t_kill
    assert info["Restarts"] == "1" and info["JobState"] not in ENDED, info
    at_failure = ckpt_step(last)  # nothing runs now: the checkpoint the requeued job must resume from
    assert 20 <= at_failure < steps
    t_back = time.time()
    subprocess.run(["bash", str(SCRIPT), "revive-node", "node2"], check=True, capture_output=True, timeout=60)
    log_path = tmp_path / f"slurm-{jid}.out"
    wait_for(lambda: job_info(jid).get("JobState") in ("RUNNING", *ENDED), 120, "the requeued job to start", jid=jid)
    t_start = time.time() - t_back
    wait_for(lambda: "restart 1 from node1" in log_path.read_text() and
             "Restoring states from the checkpoint path" in log_path.read_text(), 240, "the resumed run", jid=jid)
    t_resume = time.time() - t_back
    info = wait_done(jid, 300)
    log = log_path.read_text()
    record_property("dead_node_time_to_fail_s", round(t_fail, 1))
    record_property("dead_node_time_to_restart_s", round(t_start, 1))
    record_property("dead_node_time_to_resume_s", round(t_resume, 1))
    print(f"node2 killed -> job requeued: {t_fail:.1f} s (SlurmdTimeout {slurmd_timeout()} s); node2 back -> "
          f"job running again: {t_start:.1f} s, training resumed from step {at_failure}: {t_resume:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "DUE TO NODE FAILURE" in log, log[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in log, log[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == steps
    assert len(losses(run_dir)) == steps  # every step once: those after the checkpoint were trained again


def test_hung_rank_ends_the_job_at_the_collective_timeout_and_resubmitted_job_resumes(tmp_path, jobs):
    """node2's task stops (SIGSTOP: alive, node up, slurmd answering): only the collective timeout can end
    this. With `strategy.timeout_minutes=0.5`, node1's rank raises after 30 s in the all-reduce, exits 1, and
    srun --kill-on-bad-exit ends the job (FAILED: not requeued). A new job with the same run dir
    (LLMLAB_RUN_DIR) resumes from the last checkpoint."""
    steps = LONG["trainer.max_steps"]
    run_dir = tmp_path / "run"
    overrides = ["strategy=ddp", "strategy.timeout_minutes=0.5", *tiny(**LONG)]
    jid = sbatch_multi(tmp_path, *overrides, run_dir=run_dir)
    jobs.append(jid)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(last.exists, 240, "the first periodic checkpoint", jid=jid)
    pid = task_pid(jid, 1)
    assert netns_of(pid) == "llmlab-node2"
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.time()
    wait_for(lambda: proc_state(pid) == "T", 10, "rank 1 stopped", jid=jid, poll=0.1)
    info = wait_done(jid, 30 + 60)
    t_fail = time.time() - t_stop
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    # (the whole log, rank 0's messages included, says what ended the job if an assertion below fails)
    whole = f"rank 1 stopped; the job ended {t_fail:.1f} s later\n{log[:4000]}\n...\n{log[-4000:]}"
    assert info["JobState"] == "FAILED", whole
    # gloo's recv timeout (transport/tcp/unbound_buffer.cc) first closes every pair with "Application timeout
    # caused pair closure", then throws "Timed out waiting 30000ms for recv operation to complete": which of the
    # two a rank's all-reduce raises is a race (CI, 2026-12-07: the first). Either is the collective timeout; the
    # time since the stop (the timeout counts from rank 0's wait, at most one step before it) says it was 30 s.
    assert re.search(r"Timed out waiting 30000ms|Application timeout caused pair closure", log), whole
    assert t_fail >= 25, whole
    at_failure = ckpt_step(last)
    print(f"rank 1 stopped -> job ended: {t_fail:.1f} s (strategy.timeout_minutes=0.5)")
    jid2 = sbatch_multi(tmp_path, *overrides, run_dir=run_dir)
    jobs.append(jid2)
    info = wait_done(jid2, 300)
    log2 = (tmp_path / f"slurm-{jid2}.out").read_text()
    assert info["JobState"] == "COMPLETED", log2[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in log2, log2[-3000:]
    assert 20 <= at_failure < steps
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == steps
    assert len(losses(run_dir)) == steps
