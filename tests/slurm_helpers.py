"""What the Slurm test files share: is a cluster up, job state, waiting, and cancelling what a test
submitted. A test module marks itself `pytestmark = [pytest.mark.slurm, skip_without_cluster]`: its tests
skip, with the reason, when no cluster answers (start one: `sudo scripts/slurm_local.sh`). Importing
this module or a Slurm test module needs no cluster."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest


def cluster_state() -> tuple[bool, str]:
    """(up, why not): Slurm installed, slurmctld answering, and a node in a usable state."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False, "Slurm is not installed (no sinfo/sbatch); start it: sudo scripts/slurm_local.sh"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False, "sinfo timed out: slurmctld not answering (sudo scripts/slurm_local.sh)"
    if r.returncode != 0:
        return False, f"Slurm cluster not up (sinfo: {r.stderr.strip()[:200]}); sudo scripts/slurm_local.sh"
    states = r.stdout.split()[1::2]
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return False, f"no usable Slurm node (sinfo: {r.stdout.strip()[:200]})"
    return True, ""


UP, WHY = cluster_state()  # asked once per test session
skip_without_cluster = pytest.mark.skipif(not UP, reason=WHY)


def partition() -> str:
    """`LLMLAB_SLURM_PARTITION`, else the cluster's first (default) partition ("" without a cluster)."""
    if not UP:
        return os.environ.get("LLMLAB_SLURM_PARTITION", "")
    return os.environ.get("LLMLAB_SLURM_PARTITION") or subprocess.run(
        ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0].rstrip("*")


def job_info(jid: str) -> dict:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ...); {} once Slurm forgot the job."""
    r = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}


def wait_for(pred, timeout: float, what: str, jid: str = "", poll: float = 0.2):
    """pred()'s first truthy value within `timeout` s, else fail naming `what` (and job `jid`'s state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if v := pred():
            return v
        time.sleep(poll)
    info = job_info(jid) if jid else {}
    state = f"; job: { {k: info.get(k) for k in ('JobState', 'Reason', 'Restarts')} }" if jid else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{state}")


@pytest.fixture
def jobs():
    """Slurm job ids a test submitted; cancelled at the end whatever happened."""
    ids: list[str] = []
    yield ids
    for jid in ids:
        subprocess.run(["scancel", jid], capture_output=True)


def two_nodes_state(partition: str = "") -> tuple[bool, str]:
    """(up, why not): the two namespaced nodes node1, node2 of `scripts/slurm_local.sh start --nodes 2`
    answer, in partition `LLMLAB_SLURM_MULTI_PARTITION` (default multi)."""
    if not UP:
        return False, WHY
    part = partition or os.environ.get("LLMLAB_SLURM_MULTI_PARTITION", "multi")
    r = subprocess.run(["sinfo", "-h", "-N", "-p", part, "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    states = dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)
    usable = {n for n, s in states.items() if s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")}
    if not {"node1", "node2"} <= usable:
        return False, (f"no two-node cluster (partition {part!r}: {states or 'absent'}); "
                       "start it: sudo scripts/slurm_local.sh start --nodes 2")
    return True, ""


UP2, WHY2 = two_nodes_state()
skip_without_two_nodes = pytest.mark.skipif(not UP2, reason=WHY2)
