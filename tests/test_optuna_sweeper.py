"""The llmlab_optuna Hydra sweeper, end to end on the toy app (no torch).

Each end-to-end test runs `python tests/fixtures/toy_app/app.py -cn search -m ...` in a subprocess
with PYTHONPATH=<repo> (so Hydra discovers hydra_plugins/llmlab_optuna without an install).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "fixtures" / "toy_app" / "app.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import run_python  # noqa: E402  (after the sys.path line above)

optuna = pytest.importorskip("optuna")


def _env(out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TOY_OUT"] = str(out)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _argv(*overrides: str) -> list:
    return [str(APP), "-cn", "search", "-m", *overrides]


def _cmd(*overrides: str) -> list:  # for Popen (tests that kill a sweep while it runs)
    return [sys.executable, *_argv(*overrides)]


def _run(out: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_python(*_argv(*overrides), base_env=_env(out), timeout=timeout)


def _study(out: Path, name: str = "toy"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = out / "sweep" / "optuna_journal.log"
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def _states(study) -> dict:
    res: dict = {}
    for t in study.get_trials(deepcopy=False):
        res[t.state.name] = res.get(t.state.name, 0) + 1
    return res


def _results(out: Path) -> dict:
    import yaml

    return yaml.safe_load((out / "sweep" / "optimization_results.yaml").read_text())


def _events(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_search_completes_planned_trials(tmp_path):
    r = _run(tmp_path, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    study = _study(tmp_path)
    assert _states(study) == {"COMPLETE": 6}
    res = _results(tmp_path)
    assert res["n_complete"] == 6 and res["n_failed"] == 0 and res["finished"] is True
    assert set(res["best_params"]) == {"x", "y", "n", "opt"}
    assert res["best_value"] == pytest.approx(min(t.value for t in study.trials))
    # search space respected; job dirs 0..5 each hold the job's result
    for t in study.trials:
        assert -1.0 <= t.params["x"] <= 1.0 and 0.01 <= t.params["y"] <= 1.0
        assert t.params["n"] in range(4, 33, 4) and t.params["opt"] in "abc"
        job = json.loads((tmp_path / "sweep" / str(t.user_attrs["job_idx"]) / "result.json").read_text())
        assert job["value"] == pytest.approx(t.value)
        assert job["params"] == t.params
    # started again: nothing left to do, nothing runs
    r2 = _run(tmp_path, "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "6/6 trials complete" in r2.stdout + r2.stderr
    assert "Launching" not in r2.stdout + r2.stderr
    assert len(_study(tmp_path).trials) == 6


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_killed_search_resumes_to_planned_total(tmp_path):
    events = tmp_path / "events.jsonl"
    args = ("hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", "sleep=0.7", f"events={events}")
    p = subprocess.Popen(
        _cmd(*args), env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Wait for the 3rd job to start: trials 0 and 1 are then COMPLETE (told after their
        # batch), trials 2 and 3 RUNNING.
        deadline = time.time() + 90
        while time.time() < deadline:
            starts = [e for e in _events(events) if e["event"] == "start"]
            if len(starts) >= 3:
                break
            assert p.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the sweep did not reach its 3rd job in time")
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    first = _study(tmp_path)
    complete1 = {t.number: t for t in first.trials if t.state.name == "COMPLETE"}
    running1 = {t.number: t for t in first.trials if t.state.name == "RUNNING"}
    assert len(complete1) >= 2, _states(first)
    assert len(running1) >= 1, _states(first)
    n_events1 = len(_events(events))
    job0 = (tmp_path / "sweep" / "0" / "result.json").read_text()

    r = _run(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left RUNNING by an interrupted sweep" in r.stdout + r.stderr

    final = _study(tmp_path)
    trials = final.trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6, _states(final)  # exactly the planned total
    # the first run's complete trials are untouched
    for n, t in complete1.items():
        assert trials[n].state.name == "COMPLETE" and trials[n].value == t.value
    # the interrupted ones are FAIL (interrupted) and their params were retried
    for n, t in running1.items():
        assert trials[n].state.name == "FAIL"
        assert "interrupted" in trials[n].user_attrs["error"]
        retries = [u for u in trials if u.user_attrs.get("retry_of") == n]
        assert len(retries) == 1 and retries[0].params == t.params
        assert retries[0].state.name == "COMPLETE"
    # no finished trial ran again: the second start ran exactly the missing jobs
    ev2 = _events(events)[n_events1:]
    starts2 = [e for e in ev2 if e["event"] == "start"]
    assert len(starts2) == 6 - len(complete1)
    done_params = [t.params for t in complete1.values()]
    assert all(e["params"] != p for e in starts2 for p in done_params)
    # job numbers keep counting: the first run's job dirs are not overwritten
    assert min(e["job"] for e in starts2) >= 4
    assert (tmp_path / "sweep" / "0" / "result.json").read_text() == job0
    res = _results(tmp_path)
    assert res["n_complete"] == 6 and res["finished"] is True
    assert res["n_failed"] == len(running1)


def test_failing_jobs_are_recorded_and_sweep_completes(tmp_path):
    r = _run(
        tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
        "fail_jobs=[1]", "none_jobs=[2]", "nan_jobs=[3]",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    study = _study(tmp_path)
    by_job = {t.user_attrs["job_idx"]: t for t in study.trials}
    assert _states(study) == {"COMPLETE": 4, "FAIL": 3}
    assert by_job[1].state.name == "FAIL"
    assert "RuntimeError: toy_app: failing on purpose (job 1)" in by_job[1].user_attrs["error"]
    assert "returned None" in by_job[2].user_attrs["error"]
    assert "NaN" in by_job[3].user_attrs["error"]
    res = _results(tmp_path)
    assert res["n_complete"] == 4 and res["n_failed"] == 3
    errs = {t["job_idx"]: t.get("error", "") for t in res["trials"]}
    assert "failing on purpose" in errs[1]


def test_max_failures_stops_with_clear_error(tmp_path):
    r = _run(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
             "hydra.sweeper.max_failures=2", "fail=true")
    assert r.returncode != 0
    assert "2 jobs failed in this run (max_failures=2)" in r.stderr
    assert "failing on purpose" in r.stderr
    assert _results(tmp_path)["n_failed"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("x=interval(1.0, 0.5)", "parameter 'x': low (1.0) must be < high (0.5)"),
        ("y=tag(log, interval(0.0, 1.0))", "parameter 'y': a log scale needs low > 0"),
        ("n=range(4, 30, step=4)", "parameter 'n': high - low (26) is not a multiple of step (4)"),
    ],
)
def test_invalid_range_fails_before_any_job(tmp_path, override, message):
    r = _run(tmp_path, override)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert not (sweep / "optuna_journal.log").exists()
    assert not (sweep / "0").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("interval(2, 1)", "low (2.0) must be < high (1.0)"),
        ("tag(log, interval(-1, 1))", "a log scale needs low > 0"),
        ("range(1, 10, step=0)", "step must be a positive number"),
        ("range(1, 10, step=20)", "step (20) is larger than high - low (9)"),
        ("tag(log, range(1, 16, step=3))", "a log scale cannot have a step"),
        ("tag(lgo, interval(1, 2))", "unknown tag(s) ['lgo']"),
        ({"type": "float", "low": 1e-3, "high": 1e-5}, "low (0.001) must be < high (1e-05)"),
        ({"type": "int", "low": 0, "high": 8, "log": True}, "a log scale needs low > 0"),
        ({"type": "int", "low": 1, "high": 8.5}, "must be an integer"),
        ({"type": "categorical", "choices": []}, "needs at least one value"),
        ({"type": "normal", "low": 1, "high": 2}, "type must be float, int or categorical"),
        ({"type": "float", "low": 1}, "missing 'high'"),
    ],
)
def test_invalid_specs_name_the_parameter(spec, message):
    from hydra_plugins.llmlab_optuna._search_space import SearchSpaceError, build_search_space

    with pytest.raises(SearchSpaceError) as ei:
        build_search_space({"model.lr": spec}, [])
    assert "parameter 'model.lr'" in str(ei.value)
    assert message in str(ei.value)


def test_search_space_forms():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.llmlab_optuna._search_space import build_search_space

    search, fixed = build_search_space(
        {
            "optim.lr": "tag(log, interval(1e-5, 1e-3))",
            "peft.r": "range(4, 32, step=4)",
            "+peft.alpha": {"type": "int", "low": 8, "high": 64, "log": True},
            "optim.name": ["adamw", "sgd"],
            "data.frac": {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1},
            "seed": 7,
        },
        ["trainer.max_steps=10", "peft.dropout=choice(0.0, 0.1)", "optim.name=adamw,lion"],
    )
    d = {p.name: p.distribution() for p in search}
    assert d["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["peft.r"] == IntDistribution(4, 32, step=4)  # high included
    assert d["peft.alpha"] == IntDistribution(8, 64, log=True)
    assert d["optim.name"] == CategoricalDistribution(["adamw", "lion"])  # command line wins
    assert d["peft.dropout"] == CategoricalDistribution([0.0, 0.1])
    assert d["data.frac"] == FloatDistribution(0.1, 0.5, step=0.1)
    assert sorted(fixed) == ["seed=7", "trainer.max_steps=10"]
    alpha = next(p for p in search if p.name == "peft.alpha")
    assert alpha.override(16) == "+peft.alpha=16"
    lr = next(p for p in search if p.name == "optim.lr")
    assert lr.override(1e-4) == "optim.lr=0.0001"


def test_repair_torn_journal(tmp_path):
    from hydra_plugins.llmlab_optuna._impl import _repair_journal

    j = tmp_path / "optuna_journal.log"
    j.write_bytes(b'{"op_code":0}\n{"op_code":1}\n{"op_co')
    Path(str(j) + ".lock").symlink_to(j)
    _repair_journal(j)
    assert j.read_bytes() == b'{"op_code":0}\n{"op_code":1}\n'
    assert not os.path.lexists(str(j) + ".lock")


def test_sweeper_config_is_registered(tmp_path):
    env = _env(tmp_path)
    r = run_python(str(APP), "hydra/sweeper=llmlab_optuna", "--cfg", "hydra", "-p", "hydra.sweeper",
                   base_env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hydra_plugins.llmlab_optuna.sweeper.LlmlabOptunaSweeper" in r.stdout
    assert "n_trials: 20" in r.stdout


def test_second_sweeper_on_same_study_is_refused(tmp_path):
    events = tmp_path / "events.jsonl"
    args = ("hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "sleep=2", f"events={events}")
    first = subprocess.Popen(_cmd(*args), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not _events(events) and time.time() < deadline:
            time.sleep(0.05)
        assert _events(events), "first sweep did not start a job"
        r = _run(tmp_path, *args)
        assert r.returncode != 0
        assert "another sweeper process is running" in r.stderr
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert _states(_study(tmp_path)) == {"COMPLETE": 2}
