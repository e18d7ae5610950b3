"""tests/forkserver.py, the warm interpreter the tests fork their `python -m llmlab.*` commands from: a forked
command must be indistinguishable from `python -m` started fresh (same exit code, same output, same numbers),
a time limit must kill it as subprocess.run's does, and a command it cannot run faithfully must go fresh."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import forkserver
from tests.conftest import FAST, ROOT, run_module


def fresh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))


def forked(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = forkserver.try_run(list(argv), dict(os.environ), ROOT, timeout)
    assert done is not None, "the server was busy"
    return done


@pytest.mark.parametrize("args", [
    ["--help"],  # Hydra's app help: the job name comes from sys.argv[0] / __main__, as -m sets them
    ["--cfg", "job", "stage=dpo", "peft=lora"],
    ["trainer.gradient_clip_val=-1"],  # a refusal: exit 2, one error line
    ["stage=nope"],  # Hydra's own error for an unknown choice
], ids=["help", "cfg", "refusal", "unknown-choice"])
def test_a_forked_command_prints_and_exits_as_a_fresh_one(tmp_path, args):
    argv = ["-m", "llmlab.run", *args, f"hydra.run.dir={tmp_path}/run"]
    a, b = forked(*argv), fresh(*argv)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert a.args == b.args


def test_a_time_limit_kills_the_command_and_the_server_goes_on(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        forked("-m", "llmlab.run", "stage=sft", "trainer.max_steps=100000", f"hydra.run.dir={tmp_path}/a", timeout=1)
    again = forked("-m", "llmlab.run", "trainer.gradient_clip_val=-1", f"hydra.run.dir={tmp_path}/b")
    assert again.returncode == 2 and again.stderr.startswith("llmlab: error:"), again.stderr


def test_only_llmlab_entry_points(monkeypatch):
    assert forkserver.usable(["-m", "llmlab.run", "x=1"]) and forkserver.usable(["-m", "llmlab.eval"])
    assert not forkserver.usable(["-c", "print(1)"])
    assert not forkserver.usable(["-m", "pytest"])
    assert not forkserver.usable(["bench/readme_numbers.py"])
    monkeypatch.setenv("LLMLAB_TEST_FORKSERVER", "0")
    assert not forkserver.usable(["-m", "llmlab.run"])


def test_a_server_per_import_time_environment(monkeypatch):
    """conftest's run_python forks llmlab commands; variables read after the imports (PYTEST_CURRENT_TEST, which
    pytest changes every test, LLMLAB_*) share a server; a command given its own import-time variables
    (HF_HUB_OFFLINE here) runs fresh; when this process's own environment changes (as in-process Lightning
    code changes it), a server started in the new one serves its commands."""
    assert run_module("llmlab.run", "--help").returncode == 0
    forked, servers = forkserver.forked_commands(), forkserver.servers_started()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_other.py::test_next (call)")
    assert run_module("llmlab.run", "--help", env={"LLMLAB_CACHE": "/elsewhere"}).returncode == 0
    assert (forkserver.forked_commands(), forkserver.servers_started()) == (forked + 1, servers)
    offline = "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1"
    assert run_module("llmlab.run", "--help", env={"HF_HUB_OFFLINE": offline}).returncode == 0
    assert (forkserver.forked_commands(), forkserver.servers_started()) == (forked + 1, servers)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    for _ in range(2):
        assert run_module("llmlab.run", "--help").returncode == 0
    assert (forkserver.forked_commands(), forkserver.servers_started()) == (forked + 3, servers + 1)


@pytest.mark.distributed
def test_a_time_limit_in_a_new_session_ends_every_rank(tmp_path):
    """support_matrix.launch asks for a new session (Popen's start_new_session) so that a time limit ends the
    ranks Lightning started, not only rank 0."""
    run_dir = tmp_path / "ddp"
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.try_run(["-m", "llmlab.run", "stage=pretrain", "trainer.devices=2", "trainer.max_steps=100000",
                            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
                           {**os.environ, "OMP_NUM_THREADS": "1"}, ROOT, 25, new_session=True)
    assert (run_dir / ".hydra").is_dir()  # it had started
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], check=False, capture_output=True,
                          text=True).stdout
    assert not left.strip(), f"processes left: {left}"


@pytest.mark.slow
def test_a_forked_training_run_gives_the_fresh_runs_numbers(tmp_path):
    """The whole stack in a fork (threads, seeds, data, checkpoints) gives bit-equal losses."""
    runs = {}
    for how, run in [("forked", forked), ("fresh", fresh)]:
        done = run("-m", "llmlab.run", "stage=sft", *FAST, f"hydra.run.dir={tmp_path}/{how}")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[how] = json.loads((tmp_path / how / "summary.json").read_text())
    for key in ("train_loss_first", "train_loss_last", "val_loss_first", "val_loss_last", "global_step"):
        assert runs["forked"][key] == runs["fresh"][key], key
