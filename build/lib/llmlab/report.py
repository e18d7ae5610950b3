"""`python -m llmlab.report <sweep dir>`: one table and one plot for a sweep (Hydra -m, Optuna, Slurm).

Writes into the sweep dir (or `--out`):
  report.md   every job: its overrides (the ones that differ between jobs as columns, the shared ones
              above the table), status, the summary metrics; the best job marked, failed jobs with
              their error; printed to stdout as well
  report.csv  the same, one row per job, every override and every scalar of summary.json
  report.png  validation-loss curves of all jobs (history.json), the best one highlighted

Works on a sweep that is still running or was stopped: a job dir without summary.json is
"running/missing", and jobs of a Hydra grid that have no dir yet are "pending" (from multirun.yaml).
Optuna sweeps (hparams_search=...): trial states come from optimization_results.yaml as well.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmlab.errors import ConfigError, fail
from llmlab.redact import redact_text

FINISHED, FAILED, RUNNING, PENDING = "finished", "failed", "running/missing", "pending"
TAIL_KEYS = ("global_step", "world_size", "tokens_per_sec", "wall_seconds")


@dataclass
class Job:
    name: str
    dir: Path | None
    overrides: list[str]
    status: str
    summary: dict = field(default_factory=dict)
    error: str = ""
    history: dict = field(default_factory=dict)

    @property
    def params(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # a file being written right now
        return None


def _job_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _planned_grid(sweep_dir: Path) -> list[list[str]] | None:
    """The job overrides a basic Hydra sweep planned, in job-number order (None if not a grid)."""
    cfg = _read_yaml(sweep_dir / "multirun.yaml")
    if not isinstance(cfg, dict):
        return None
    hydra = cfg.get("hydra") or {}
    sweeper = str((hydra.get("sweeper") or {}).get("_target_", ""))
    if not sweeper.endswith("BasicSweeper"):
        return None
    try:
        # lazy: Hydra only for a sweep's plan (llmlab.report answers --help and reads run dirs without it)
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = (hydra.get("sweeper") or {}).get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list((hydra.get("overrides") or {}).get("task") or [])
        parsed = OverridesParser.create().parse_overrides(args)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - the plan is a nicety; the job dirs are the truth
        return None


def _optuna_trials(sweep_dir: Path) -> tuple[dict | None, dict[str, dict]]:
    res = _read_yaml(sweep_dir / "optimization_results.yaml")
    if not isinstance(res, dict):
        return None, {}
    by_dir = {}  # job dir name (= hydra.job.num = the trial's job_idx) -> trial
    for t in res.get("trials") or []:
        key = t.get("job_idx") if t.get("job_idx") is not None else Path(str(t.get("job_dir") or "")).name
        by_dir[str(key)] = t
    return res, by_dir


def load_jobs(sweep_dir: Path) -> list[Job]:
    jobs: list[Job] = []
    _, trials = _optuna_trials(sweep_dir)
    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ((p / ".hydra").is_dir() or (p / "summary.json").exists())), key=_job_key)
    for d in dirs:
        trial = trials.get(d.name)
        overrides = _read_yaml(d / ".hydra" / "overrides.yaml") or [
            f"{k}={v}" for k, v in ((trial or {}).get("params") or {}).items()]
        summary = _read_json(d / "summary.json") or {}
        status = {"finished": FINISHED, "failed": FAILED}.get(summary.get("status"), summary.get("status") or RUNNING)
        error = summary.get("error", "") if status == FAILED else ""
        if status == RUNNING and trial and trial.get("state") == "FAIL":  # e.g. interrupted by a kill
            status, error = FAILED, str(trial.get("error", "")).splitlines()[0] if trial.get("error") else ""
        # what users typed may hold credentials (+wandb_api_key=..., storage URLs): never into the report
        jobs.append(Job(d.name, d, [redact_text(str(o)) for o in overrides], status, summary,
                        redact_text(str(error)), _read_json(d / "history.json") or {}))
    planned = _planned_grid(sweep_dir)
    if planned:
        have = {j.name for j in jobs}
        jobs += [Job(str(i), None, ov, PENDING) for i, ov in enumerate(planned) if str(i) not in have]
        jobs.sort(key=lambda j: (0, int(j.name), "") if j.name.isdigit() else (1, 0, j.name))
    return jobs


def _sweep_settings(sweep_dir: Path) -> tuple[str, str]:
    cfg = _read_yaml(sweep_dir / "multirun.yaml") or {}
    metric = cfg.get("optimized_metric") or "val_loss_last"
    direction = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("direction", "minimize")
    return str(metric), direction if direction in ("minimize", "maximize") else "minimize"


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def best_job(jobs: list[Job], metric: str, direction: str) -> Job | None:
    scored = [(v, j) for j in jobs if j.status == FINISHED and (v := _number(j.summary.get(metric))) is not None]
    if not scored:
        return None
    pick = min if direction == "minimize" else max
    return pick(scored, key=lambda vj: vj[0])[1]


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _md_cell(x: Any, limit: int = 0) -> str:
    s = _fmt(x).replace("|", "\\|").replace("\n", " ")
    return s[: limit - 1] + "…" if limit and len(s) > limit else s


def split_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """Keys whose value differs between jobs (columns) and the shared key=value pairs. Jobs that lack
    a key (a job killed before Hydra wrote its overrides.yaml) do not make it vary."""
    values: dict[str, set] = {}
    for j in jobs:
        for k, v in j.params.items():
            values.setdefault(k, set()).add(v)
    varying = [k for k, vs in values.items() if len(vs) > 1]
    common = {k: next(iter(vs)) for k, vs in values.items() if len(vs) == 1}
    return varying, common


def _short(value: str) -> str:
    """0.002019907822684476 -> 0.00202 (tables and legends; the CSV keeps every digit)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return value
    return f"{x:.4g}" if len(str(value)) > 8 and not str(value).isdigit() else value


def metric_keys(jobs: list[Job], metric: str) -> tuple[list[str], list[str]]:
    """(keys for the markdown table, every scalar key for the CSV)."""
    scalar: list[str] = []
    for j in jobs:
        scalar += [k for k, v in j.summary.items()
                   if k not in scalar and (isinstance(v, (int, float, str)) or v is None)
                   and k not in ("status", "error", "run_dir")]
    last = sorted(k for k in scalar if k.endswith("_last") and k != metric)
    table = [metric] + last + [k for k in TAIL_KEYS if k in scalar]
    return table, [metric] + [k for k in scalar if k != metric]


def render_markdown(sweep_dir: Path, jobs: list[Job], metric: str, direction: str, best: Job | None) -> str:
    varying, common = split_overrides(jobs)
    table_keys, _ = metric_keys(jobs, metric)
    counts = {s: sum(j.status == s for j in jobs) for s in (FINISHED, FAILED, RUNNING, PENDING)}
    lines = [f"# Sweep report: `{sweep_dir}`", ""]
    lines.append(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                 + f". Objective: {direction} `{metric}`.")
    optuna, _ = _optuna_trials(sweep_dir)
    if optuna:
        lines.append(f"Optuna study `{optuna.get('study_name')}`: {optuna.get('n_complete')}/"
                     f"{optuna.get('n_trials_planned')} trials complete, {optuna.get('n_failed')} failed.")
    if best is not None:
        shown = " ".join(f"{k}={_short(best.params[k])}" for k in varying if k in best.params) or "(no varying override)"
        lines.append(f"**Best: job {best.name}** ({shown}): {metric} = {_fmt(best.summary.get(metric))}.")
    else:
        lines.append("No finished job has the objective yet.")
    if common:
        lines += ["", "Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items())]
    header = ["job", "status", *varying, *table_keys, "error"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        mark = " ★" if j is best else ""
        row = [f"**{j.name}**{mark}" if j is best else j.name, j.status]
        row += [_md_cell(_short(j.params.get(k, ""))) for k in varying]
        row += [_md_cell(j.summary.get(k)) for k in table_keys]
        row.append(_md_cell(j.error, 160))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![validation loss](report.png)", ""]
    return "\n".join(lines)


def write_csv(path: Path, jobs: list[Job], metric: str, best: Job | None) -> None:
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j.params if k not in keys]
    _, scalars = metric_keys(jobs, metric)
    header = ["job", "status", "best", *keys, *[k for k in scalars if k not in keys], "error", "dir"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for j in jobs:
            w.writerow([j.name, j.status, j is best, *[j.params.get(k, "") for k in keys],
                        *[_fmt(j.summary.get(k)) for k in scalars if k not in keys], j.error,
                        str(j.dir) if j.dir else ""])


def plot_curves(path: Path, jobs: list[Job], best: Job | None, metric: str, curve: str) -> None:
    # lazy: matplotlib (heavy) only when a plot is drawn; pyplot after the Agg backend is chosen
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying, _ = split_overrides(jobs)
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for j in jobs:
        points = j.history.get(curve) or []
        if not points:
            continue
        steps, values = zip(*points)
        label = f"job {j.name}: " + (" ".join(f"{k.split('.')[-1]}={_short(j.params[k])}" for k in varying
                                               if k in j.params) or j.status)
        if j is best:
            ax.plot(steps, values, "o-", color="crimson", linewidth=2.8, zorder=3,
                    label=f"best — {label} ({metric}={_fmt(j.summary.get(metric))})")
        else:
            ax.plot(steps, values, ".-", linewidth=1.1, alpha=0.55, label=label)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no '{curve}' history yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(curve)
    ax.set_title(f"{path.parent.name}: {curve} of {drawn} job(s)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    with warnings.catch_warnings():  # many jobs: a big legend
        warnings.simplefilter("ignore")
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(sweep_dir: str | Path, out: str | Path | None = None, metric: str | None = None,
           direction: str | None = None, curve: str = "val/loss") -> dict:
    """Write report.md/.csv/.png; returns {"jobs", "best", "markdown", "paths"}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir}: no such sweep dir; give a sweep dir such as outputs/<task>/multiruns/<time> "
                          f"or outputs/hparams_search/<study>")
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise ConfigError(f"{sweep_dir}: no job dirs (<n>/.hydra) here; give a sweep dir such as "
                          f"outputs/<task>/multiruns/<time> or outputs/hparams_search/<study>")
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for report.md/.csv/.png")
    default_metric, default_direction = _sweep_settings(sweep_dir)
    known = sorted({k for j in jobs for k, v in j.summary.items() if _number(v) is not None})
    if metric and known and metric not in known:
        close = difflib.get_close_matches(metric, known, n=1)
        raise ConfigError(f"--metric {metric}: no job's summary.json has it; "
                          + (f"did you mean --metric {close[0]}?" if close else f"use one of {', '.join(known)}"))
    metric, direction = metric or default_metric, direction or default_direction
    best = best_job(jobs, metric, direction)
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(sweep_dir, jobs, metric, direction, best)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text(md)
    write_csv(paths["csv"], jobs, metric, best)
    plot_curves(paths["png"], jobs, best, metric, curve)
    return {"jobs": jobs, "best": best, "markdown": md, "paths": paths}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `llmlab: error:` line (exit 2), like every llmlab entry point."""

    def error(self, message):
        fail(f"{message} (usage: {' '.join(self.format_usage().split()).removeprefix('usage: ')})")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m llmlab.report", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", help="a multirun dir (outputs/<task>/multiruns/<time>, hparams_search/<study>)")
    p.add_argument("--out", help="write report.* here instead of the sweep dir")
    p.add_argument("--metric", help="summary.json key that ranks jobs (default: the sweep's optimized_metric)")
    p.add_argument("--maximize", action="store_true", help="higher is better (default: the sweep's direction)")
    p.add_argument("--curve", default="val/loss", help="history.json key to plot (default: val/loss)")
    args = p.parse_args(argv)
    try:
        res = report(args.sweep_dir, args.out, args.metric, "maximize" if args.maximize else None, args.curve)
    except ConfigError as err:
        fail(err)
    print(res["markdown"])
    print(f"written: {', '.join(str(v) for v in res['paths'].values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
