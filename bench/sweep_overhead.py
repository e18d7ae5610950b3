"""Overhead of sweeps: a 4-job local multirun vs 4 single runs, and time from `sbatch` to the first
training step on a Slurm cluster (the sbatch template, and `-m launcher=slurm`).

    .venv/bin/python bench/sweep_overhead.py                 # all parts; appends to bench/RESULTS.md
    .venv/bin/python bench/sweep_overhead.py --parts local   # only the local comparison
    .venv/bin/python bench/sweep_overhead.py --no-append     # print only

Every job is the tiny pretraining run of the tests (2 layers, 32 wide, 6 steps), so the numbers are
almost all overhead: process start, imports, Hydra composition, model/data build, Slurm scheduling.
The first training step is stamped by a callback added from the command line
(`+callbacks.first_step._target_=bench.sweep_overhead.FirstStepStamp`), the same extension point a
user's callback would use.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "data.n_train=300",
        "data.n_val=32", "trainer.enable_progress_bar=false", "model.config.n_layer=2", "model.config.n_embd=32",
        "model.config.n_head=2", "callbacks.samples=null", "callbacks.hf_export=null"]
LRS = ["1e-3", "2e-3", "3e-3", "4e-3"]


class FirstStepStamp:
    """Lightning callback (duck-typed base imported lazily): writes time.time() after the first
    optimizer step of rank 0 to `path`."""

    def __new__(cls, path: str):
        import lightning as L

        class _Stamp(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step == 1 and trainer.is_global_zero and not Path(path).exists():
                    Path(path).write_text(f"{time.time():.3f}\n")

        return _Stamp()


def stamp_overrides(path: Path) -> list[str]:
    return ["+callbacks.first_step._target_=bench.sweep_overhead.FirstStepStamp",
            f"+callbacks.first_step.path={path}"]


def _run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def bench_local(tmp: Path) -> dict:
    py = sys.executable
    singles = []
    for i, lr in enumerate(LRS):
        singles.append(_run([py, "-m", "llmlab.run", *TINY, f"stage.module.optimizer.lr={lr}",
                             f"hydra.run.dir={tmp}/single{i}"]))
    multirun = _run([py, "-m", "llmlab.run", "-m", *TINY, f"stage.module.optimizer.lr={','.join(LRS)}",
                     f"hydra.sweep.dir={tmp}/multirun"])
    # RunSummary's wall_seconds: from the trainer's callbacks being built to the end of fit
    fit_multi = [json.loads((tmp / "multirun" / str(i) / "summary.json").read_text())["wall_seconds"]
                 for i in range(len(LRS))]
    fit_single = [json.loads((tmp / f"single{i}" / "summary.json").read_text())["wall_seconds"]
                  for i in range(len(LRS))]
    n = len(LRS)
    return {"singles_s": [round(x, 1) for x in singles], "singles_total_s": round(sum(singles), 1),
            "singles_fit_s": round(sum(fit_single), 1),
            "multirun_s": round(multirun, 1), "multirun_fit_s": round(sum(fit_multi), 1),
            "saved_per_job_s": round((sum(singles) - multirun) / n, 1),
            "overhead_per_single_run_s": round((sum(singles) - sum(fit_single)) / n, 1),
            "overhead_per_multirun_job_s": round((multirun - sum(fit_multi)) / n, 1)}


def _slurm_job(jid: str) -> dict:
    r = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _epoch(slurm_time: str) -> float:
    return datetime.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S").timestamp()


def bench_sbatch(tmp: Path, tasks: int) -> dict:
    stamp = tmp / f"first_step_{tasks}.txt"
    extra = ["strategy=ddp"] if tasks > 1 else []
    env = {**os.environ, "LLMLAB_PYTHON": sys.executable, "LLMLAB_LOG_DIR": str(tmp)}
    t0 = time.time()
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--ntasks-per-node={tasks}",
                        "--cpus-per-task=1", "--mem=3G", "--time=10", f"--output={tmp}/slurm-%j.out",
                        "slurm/single_node.sbatch", *extra, *TINY, *stamp_overrides(stamp)],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    jid = r.stdout.strip().split(";")[0]
    while not stamp.exists():
        if _slurm_job(jid).get("JobState") in ("FAILED", "CANCELLED", "COMPLETED") and not stamp.exists():
            time.sleep(2)
            if not stamp.exists():
                raise RuntimeError(f"job {jid} ended without a first step: {(tmp / f'slurm-{jid}.out').read_text()[-2000:]}")
        time.sleep(0.1)
    first = float(stamp.read_text())
    start = _epoch(_slurm_job(jid)["StartTime"])
    while _slurm_job(jid).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.5)
    # StartTime has 1 s resolution (truncated): clamp the split, the total is exact
    to_start = max(0.0, start - t0)
    return {"tasks": tasks, "sbatch_to_first_step_s": round(first - t0, 1),
            "sbatch_to_job_start_s": round(to_start, 1), "job_start_to_first_step_s": round(first - t0 - to_start, 1)}


def bench_launcher(tmp: Path) -> dict:
    stamp = tmp / "first_step_launcher.txt"
    t0 = time.time()
    total = _run([sys.executable, "-m", "llmlab.run", "-m", "launcher=slurm", "slurm.time_min=10", "slurm.mem_gb=3",
                  *TINY, *stamp_overrides(stamp), f"hydra.sweep.dir={tmp}/launcher"])
    return {"command_to_first_step_s": round(float(stamp.read_text()) - t0, 1), "command_total_s": round(total, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="local,slurm", help="comma list of: local, slurm")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    parts = args.parts.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    res: dict = {}
    load0 = os.getloadavg()[0]
    if "local" in parts:
        res["local"] = bench_local(tmp)
        print("local:", res["local"], flush=True)
    if "slurm" in parts:
        if shutil.which("sbatch") is None:
            res["slurm"] = "skipped: no sbatch (sudo scripts/slurm_local.sh)"
        else:
            res["sbatch_1_task"] = bench_sbatch(tmp, 1)
            print("sbatch 1 task:", res["sbatch_1_task"], flush=True)
            res["sbatch_2_tasks_ddp"] = bench_sbatch(tmp, 2)
            print("sbatch 2 tasks:", res["sbatch_2_tasks_ddp"], flush=True)
            res["launcher_slurm_1_job"] = bench_launcher(tmp)
            print("launcher=slurm:", res["launcher_slurm_1_job"], flush=True)
    res["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_append:
        write_results(res, " ".join([Path(sys.executable).name, *sys.argv]))


def write_results(res: dict, command: str) -> None:
    lines = [f"\n## sweep_overhead ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
             f"`{command}` on {platform.node()} ({os.cpu_count()} CPUs; 1-min load average before/after: "
             f"{res['load_avg_1min'][0]} / {res['load_avg_1min'][1]}). Each job: tiny pretraining, 6 steps.\n"]
    if "local" in res:
        lo = res["local"]
        lines += ["| local | wall time |", "|---|---|",
                  f"| 4 single runs (`python -m llmlab.run ...` x4) | {lo['singles_total_s']} s "
                  f"({', '.join(map(str, lo['singles_s']))}) |",
                  f"| 1 multirun of 4 jobs (`python -m llmlab.run -m ... lr=a,b,c,d`) | {lo['multirun_s']} s "
                  f"(of which trainer.fit {lo['multirun_fit_s']} s) |",
                  f"| saved per job by the multirun | {lo['saved_per_job_s']} s |",
                  f"| overhead outside trainer.fit, per single run | {lo['overhead_per_single_run_s']} s "
                  f"(fit {lo['singles_fit_s']} s in all) |",
                  f"| overhead outside trainer.fit, per multirun job | {lo['overhead_per_multirun_job_s']} s |", ""]
    for key, title in (("sbatch_1_task", "sbatch template, 1 task"), ("sbatch_2_tasks_ddp", "sbatch template, 2 tasks DDP")):
        if key in res:
            s = res[key]
            lines.append(f"- {title}: sbatch -> first training step {s['sbatch_to_first_step_s']} s "
                         f"(sbatch -> job start {s['sbatch_to_job_start_s']} s, 1 s resolution; job start -> first "
                         f"step {s['job_start_to_first_step_s']} s)")
    if "launcher_slurm_1_job" in res:
        s = res["launcher_slurm_1_job"]
        lines.append(f"- `-m launcher=slurm`, 1 job: command start -> first training step {s['command_to_first_step_s']} s; "
                     f"command total {s['command_total_s']} s")
    if isinstance(res.get("slurm"), str):
        lines.append(f"- Slurm: {res['slurm']}")
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nEach section: the command that produced it, then its numbers.\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
