"""Sweeps on this machine: Hydra multirun through the real CLI, the sweep report, clear errors, and an
Optuna search (hparams_search=pretrain_lr) killed with SIGKILL and started again.

The Slurm side (launcher=slurm, sbatch templates, preemption) is in tests/test_slurm_llmlab.py.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, ROOT, run_module, run_python

# FAST without the sample-generation and HF-export callbacks: sweeps run several jobs
TINY = [*FAST, "callbacks.samples=null", "callbacks.hf_export=null"]


def tiny(**changes) -> list[str]:
    out = [o for o in TINY if o.split("=")[0] not in changes]
    return out + [f"{k}={v}" for k, v in changes.items()]


def llmlab(*args: str, timeout: int = 300, env: dict | None = None, module: str = "llmlab.run"):
    return run_module(module, *args, timeout=timeout, env=env)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_multirun_records_failed_job_and_report_lists_every_job(tmp_path):
    """3 jobs, one with a value refused by the job's checks (lr=-1): the sweep completes,
    the failure is recorded, and the report ranks the two others."""
    sweep = tmp_path / "sweep"
    r = llmlab("-m", *tiny(), "stage.module.optimizer.lr=1e-3,3e-3,-1.0", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert [d.name for d in dirs] == ["0", "1", "2"]
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    assert [s["status"] for s in summaries] == ["finished", "finished", "failed"]
    assert "stage.module.optimizer.lr=-1.0: the learning rate must be a positive number" in summaries[2]["error"]
    assert "Traceback" in (dirs[2] / "error.txt").read_text()
    assert all(s["global_step"] == 6 for s in summaries[:2])
    assert yaml.safe_load((dirs[2] / ".hydra" / "overrides.yaml").read_text())[-1] == "stage.module.optimizer.lr=-1.0"

    rep = llmlab(str(sweep), module="llmlab.report", timeout=120)
    assert rep.returncode == 0, rep.stderr
    best = min((0, 1), key=lambda i: summaries[i]["val_loss_last"])
    md = (sweep / "report.md").read_text()
    assert md.strip() in rep.stdout
    assert f"**Best: job {best}**" in md and f"| **{best}** ★ | finished |" in md
    assert "| 2 | failed | -1.0 |" in md and "ConfigError: stage.module.optimizer.lr=-1.0" in md
    assert "`trainer.max_steps=6`" in md  # shared overrides listed once, above the table
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [(row["job"], row["status"], row["best"]) for row in rows] == [
        ("0", "finished", str(best == 0)), ("1", "finished", str(best == 1)), ("2", "failed", "False")]
    assert rows[0]["stage.module.optimizer.lr"] == "0.001"  # as Hydra wrote it in overrides.yaml
    assert float(rows[best]["val_loss_last"]) == pytest.approx(summaries[best]["val_loss_last"], rel=1e-3)
    assert "stage.module.optimizer.lr=-1.0" in rows[2]["error"]
    assert (sweep / "report.png").stat().st_size > 10_000


def _fake_job(sweep: Path, num: int, overrides: list[str], summary: dict | None, history: dict | None = None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if history is not None:
        (d / "history.json").write_text(json.dumps(history))


def test_report_on_a_partial_sweep(tmp_path):
    """Finished, failed, running (dir without summary) and not yet started (grid job without dir)."""
    from llmlab.report import PENDING, RUNNING, report

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    task = ["trainer.max_steps=10", "stage.module.optimizer.lr=1e-3,2e-3,3e-3,4e-3"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({
        "optimized_metric": "val_loss_last",
        "hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                              "params": None},
                  "overrides": {"task": task}}}))
    grid = [["trainer.max_steps=10", f"stage.module.optimizer.lr={lr}"] for lr in ("1e-3", "2e-3", "3e-3", "4e-3")]
    curve = {"val/loss": [[0, 5.5], [5, 5.0], [10, 4.5]]}
    _fake_job(sweep, 0, grid[0], {"status": "finished", "val_loss_last": 4.5, "global_step": 10}, curve)
    _fake_job(sweep, 1, grid[1], {"status": "failed", "error": "RuntimeError: out of memory"})
    _fake_job(sweep, 2, grid[2], None, None)  # started, nothing written yet
    res = report(sweep)
    assert [(j.name, j.status) for j in res["jobs"]] == [
        ("0", "finished"), ("1", "failed"), ("2", RUNNING), ("3", PENDING)]
    assert res["best"].name == "0"
    md = res["markdown"]
    assert "4 jobs: 1 finished, 1 failed, 1 running/missing, 1 pending" in md
    assert "| 3 | pending | 0.004 |" in md  # as Hydra writes it in overrides.yaml
    assert "RuntimeError: out of memory" in md
    assert res["paths"]["png"].stat().st_size > 10_000
    # an empty dir is an error that says what to give
    (tmp_path / "empty").mkdir()
    r = llmlab(str(tmp_path / "empty"), module="llmlab.report", timeout=60)
    assert r.returncode == 2 and "no job dirs" in r.stderr


def test_unknown_choice_in_a_sweep_fails_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    r = llmlab("-m", "model=tiny,no_such_model", f"hydra.sweep.dir={sweep}", timeout=120)
    assert r.returncode != 0
    assert "Could not find 'model/no_such_model'" in r.stderr
    assert "Available options in 'model'" in r.stderr and "tiny" in r.stderr
    assert not sweep.exists() or job_dirs(sweep) == []


def test_invalid_optuna_range_fails_before_any_trial(tmp_path):
    sweep = tmp_path / "search"
    r = llmlab("-m", "hparams_search=pretrain_lr", f"hydra.sweep.dir={sweep}",
               "stage.module.optimizer.lr=tag(log, interval(0, 1e-2))", timeout=120)
    assert r.returncode != 0
    assert "stage.module.optimizer.lr" in r.stderr and "log" in r.stderr and "low" in r.stderr, r.stderr[-2000:]
    assert not sweep.exists() or job_dirs(sweep) == []


def test_slurm_launcher_without_sbatch_stops_before_submitting(tmp_path):
    sweep = tmp_path / "sweep"
    venv_bin = str(Path(sys.executable).parent)  # python, but no Slurm commands
    r = llmlab("-m", "launcher=slurm", "stage.module.optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}",
               env={"PATH": venv_bin}, timeout=120)
    assert r.returncode != 0
    assert "launcher=slurm submits every sweep job with `sbatch`, which is not on the PATH" in r.stderr
    assert "launcher=local" in r.stderr
    assert not sweep.exists()


def test_slurm_launcher_without_multirun_is_refused(tmp_path):
    r = llmlab("launcher=slurm", f"hydra.run.dir={tmp_path / 'run'}", *tiny(), timeout=180,
               env={"SLURM_JOB_ID": ""})
    assert r.returncode == 2
    assert "launcher=slurm submits sweep jobs; without -m" in r.stderr


def _results(sweep: Path) -> dict:
    path = sweep / "optimization_results.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    except yaml.YAMLError:
        return {}


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_optuna_search_killed_and_restarted_completes_the_plan(tmp_path):
    """hparams_search=pretrain_lr with 3 planned trials: SIGKILL while the 2nd trial trains, start the
    same command again: 3 COMPLETE trials, the finished one not run again, the killed one retried."""
    sweep = tmp_path / "search"
    cmd = [sys.executable, "-m", "llmlab.run", "-m", "hparams_search=pretrain_lr", f"hydra.sweep.dir={sweep}",
           "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
           *tiny(**{"trainer.max_steps": 4, "trainer.val_check_interval": 2})]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if _results(sweep).get("n_complete", 0) >= 1 and (sweep / "1" / ".hydra").is_dir():
                break
            time.sleep(0.1)
        assert first.poll() is None, "the search ended before it could be killed:\n" + first.stderr.read()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # the sweeper and its job: no cleanup runs
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = _results(sweep)
    assert before["n_complete"] == 1 and before["finished"] is False
    done_first = next(t for t in before["trials"] if t["state"] == "COMPLETE")

    second = run_python(*cmd[1:], timeout=300)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    res = _results(sweep)
    assert res["finished"] is True and res["n_complete"] == 3 and res["n_trials_planned"] == 3
    trials = {t["number"]: t for t in res["trials"]}
    complete = [t for t in trials.values() if t["state"] == "COMPLETE"]
    assert trials[done_first["number"]]["value"] == done_first["value"]  # kept, not run again
    assert len({t["job_idx"] for t in complete}) == 3
    interrupted = [t for t in trials.values() if t["state"] == "FAIL"]
    assert len(interrupted) == 1 and "interrupted" in interrupted[0]["error"]
    retry = [t for t in complete if t.get("retry_of") == interrupted[0]["number"]]
    assert retry and retry[0]["params"] == interrupted[0]["params"]
    # job dirs keep counting across the restart: 0 (done), 1 (killed), 2 and 3 (second start)
    assert [d.name for d in job_dirs(sweep)] == ["0", "1", "2", "3"]

    from llmlab.report import report

    rep = report(sweep)
    statuses = {j.name: j.status for j in rep["jobs"]}
    assert statuses == {"0": "finished", "1": "failed", "2": "finished", "3": "finished"}
    assert rep["best"].summary["val_loss_last"] == pytest.approx(res["best_value"])
    assert "Optuna study `pretrain_lr`: 3/3 trials complete" in rep["markdown"]


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_search_with_locally_spawned_ddp_jobs_is_refused_with_the_reason(tmp_path):
    """Lightning starts extra local processes by re-running the command line: in an Optuna search that
    would start a second sweeper and hang the job; the job fails at once and the sweep says why."""
    sweep = tmp_path / "search"
    r = llmlab("-m", "hparams_search=pretrain_lr", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.max_failures=1", "strategy=ddp", "trainer.devices=2", *tiny(), timeout=240)
    assert r.returncode != 0
    assert "trainer.devices=2 in a search sweep" in r.stderr and "launcher=slurm" in r.stderr, r.stderr[-2000:]
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "failed"
    assert _results(sweep)["trials"][0]["job_dir"] == str(sweep / "0")


def test_slurm_launcher_resources_per_job():
    """How a job's config becomes sbatch options (no cluster needed): tasks = devices, GPUs on GPU
    runs only, Lightning's warning signal, requeue allowed, and a clear error for devices=auto."""
    from omegaconf import OmegaConf

    from hydra_plugins.llmlab_slurm.launcher import SlurmLauncherError, resolve_job_params

    base = {"tasks_per_node": 4, "nodes": 2, "timeout_min": 240, "cpus_per_task": 8, "accelerator": "gpu",
            "gpus_per_node": "auto", "signal_delay_s": 300, "signal": "USR1", "additional_parameters": {}}
    p = resolve_job_params(OmegaConf.create(base))
    assert (p["tasks_per_node"], p["nodes"], p["gpus_per_node"]) == (4, 2, 4)
    assert p["additional_parameters"] == {"signal": "USR1@300", "requeue": True}
    assert "accelerator" not in p and "signal" not in p
    assert resolve_job_params(OmegaConf.create({**base, "accelerator": "cpu"}))["gpus_per_node"] is None
    mine = resolve_job_params(OmegaConf.create({**base, "additional_parameters": {"signal": "B:USR2@60"}}))
    assert mine["additional_parameters"]["signal"] == "B:USR2@60"
    with pytest.raises(SlurmLauncherError, match=r"tasks_per_node must be a whole number .* \(from trainer.devices\)"):
        resolve_job_params(OmegaConf.create({**base, "tasks_per_node": "auto"}))
