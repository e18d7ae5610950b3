"""The pipeline's `eval` step, "did this stage help?": the same lm-eval task set on the model the chain
started from and on every stage's exported model, compared in one table and one plot.

A chain file (conf/pipeline/*.yaml) enables it with an `eval:` node (`task_set`, `overrides` for
`python -m llmlab.eval`); `pipeline.eval=null` turns it off. Each model is evaluated by its own
`python -m llmlab.eval` process (as each stage is its own `llmlab.run` process), so a run dir is loaded
as that stage exported it and the numbers are the ones `llmlab.eval` prints. Reward-model stages are
left out (a classifier has no log-likelihoods to score). Writes `<out_dir>/eval/<i>_<name>.json`,
`eval_comparison.json`, `eval_comparison.md` (a row per model) and `eval_comparison.png`. A re-run
evaluates again only the models whose stage ran again (or whose settings changed).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llmlab.checks.settings import override_list
from llmlab.errors import PipelineError

log = logging.getLogger("llmlab.pipeline")


def _stage_kind(stage) -> str | None:
    for o in stage.overrides:
        if str(o).startswith("stage="):
            return str(o).split("=", 1)[1]
    return None


def eval_targets(cfg, out_dir: Path, entries: list[dict]) -> list[dict]:
    """[{name, model (path to evaluate), ran (its stage ran in this call)}]: the chain's starting model
    (when its first stage starts from a saved model), then every stage that is a causal LM."""
    stages = {s.name: s for s in cfg.pipeline.stages}
    targets = []
    first = entries[0] if entries else None
    if first and first.get("run_dir") and first["status"] != "given":
        try:
            run_cfg = OmegaConf.load(Path(first["run_dir"]) / "config_resolved.yaml")
            if run_cfg.model.init == "pretrained" and Path(str(run_cfg.model.pretrained)).is_dir():
                targets.append({"name": "base", "model": str(run_cfg.model.pretrained), "ran": False})
        except (OSError, ValueError, AttributeError):
            pass
    for e in entries:
        if _stage_kind(stages[e["name"]]) == "rm":
            continue
        model = e["run_dir"] if e["status"] != "given" else e["model"]
        targets.append({"name": e["name"], "model": model, "ran": e["status"] == "finished"})
    return targets


def _evaluate(target: dict, task_set: str, overrides: list[str], out: Path) -> dict:
    key = {"model": target["model"], "task_set": task_set, "overrides": overrides}
    if out.is_file() and not target["ran"]:
        try:
            previous = json.loads(out.read_text())
            if previous.get("pipeline_key") == key:
                log.info("eval %s: evaluated earlier, kept (%s)", target["name"], out)
                return previous
        except ValueError:
            pass
    cmd = [sys.executable, "-m", "llmlab.eval", target["model"], f"eval={task_set}", *overrides, f"out={out}"]
    log.info("eval %s: %s", target["name"], " ".join(cmd[3:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("llmlab: error:")), lines[-1] if lines else "")
        raise PipelineError(f"eval step, model '{target['name']}' ({target['model']}) failed (exit "
                            f"{proc.returncode}): {reason.removeprefix('llmlab: error: ')}",
                            code=2 if proc.returncode == 2 else 1)
    result = json.loads(out.read_text())
    result["pipeline_key"] = key
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_eval_step(cfg, out_dir: Path, entries: list[dict]) -> dict | None:
    spec = cfg.pipeline.get("eval")
    if not spec:
        return None
    task_set = str(spec.get("task_set", "builtin"))
    overrides = override_list(spec.get("overrides"), "pipeline.eval.overrides")
    overrides += override_list(cfg.get("eval_overrides"), "eval_overrides")
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, target in enumerate(eval_targets(cfg, out_dir, entries)):
        result = _evaluate(target, task_set, overrides, out_dir / "eval" / f"{i}_{target['name']}.json")
        metrics = {f"{task}/{name}": value for task, r in result["tasks"].items()
                   for name, value in r["metrics"].items()}
        rows.append({"name": target["name"], "model": target["model"], "metrics": metrics,
                     "seconds": result.get("seconds")})
    comparison = {"task_set": task_set, "overrides": overrides, "rows": rows,
                  "lm_eval_version": result["lm_eval_version"] if rows else None}
    (out_dir / "eval_comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out_dir / "eval_comparison.md").write_text(comparison_markdown(cfg.pipeline.name, comparison))
    plot_comparison(comparison, out_dir / "eval_comparison.png")
    return comparison


def comparison_markdown(pipeline: str, comparison: dict) -> str:
    rows = comparison["rows"]
    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# pipeline {pipeline}: did each stage help? (lm-eval, eval={comparison['task_set']}"
             + (f", {' '.join(comparison['overrides'])}" if comparison["overrides"] else "") + ")", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    previous = None
    for r in rows:
        cells = []
        for n in names:
            v = r["metrics"].get(n)
            delta = "" if previous is None or v is None or previous.get(n) is None else f" ({v - previous[n]:+.4f})"
            cells.append(fmt(v) + delta)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        previous = r["metrics"]
    lines += ["", "In parentheses: the change from the row above. Models: "
              + "; ".join(f"{r['name']} = {r['model']}" for r in rows)]
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: dict, path: Path) -> None:
    # lazy: matplotlib (heavy) only when a plot is drawn; pyplot after the Agg backend is chosen
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(rows) + 2), 3.5))
    x = list(range(len(rows)))
    for n in names:
        ax.plot(x, [r["metrics"].get(n) for r in rows], "o-", label=n)
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylabel("score")
    ax.set_title(f"lm-eval {comparison['task_set']} after each stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
