"""`python -m llmlab.pipeline pipeline=<chain> [overrides=[...]]`: run a chain of stages declared in config.

A chain (conf/pipeline/<name>.yaml) is a list of stages, each a list of `llmlab.run` overrides. In an
override, `{<earlier stage name>}` stands for that stage's exported model (`<its run dir>/hf`), e.g.
`model.pretrained={sft}` or `stage.reward_model={rm}`. Each stage runs as its own process
(`python -m llmlab.run ... hydra.run.dir=<out_dir>/<i>_<name>`), so it keeps its own run dir,
summary.json and logs (`stage.log`).

- Re-running the same command skips every stage that finished with the same overrides (its
  summary.json says finished and its hf/ exists); a stage whose overrides changed runs again, and so
  does every stage after one that ran.
- A failed stage stops the chain: the message names the stage, its exit code, the error and the
  run dir; fix it and re-run the command (finished stages are kept).
- `base=<run dir or HF dir>` replaces the chain's base stage (`base_stage: true`, e.g. pretrain);
  `+given.<stage>=<dir>` replaces any stage with an existing run.
- `<out_dir>/pipeline_summary.json` and `pipeline_summary.md` compare the stages (headline metrics
  first -> last, and the held-out exact match of every policy along the chain). A policy stage's
  `held_out_exact_match_by_stage` entry holds its start and end model's EM on its own held-out prompts
  (what an RL stage did to the SFT model it started from).
- The `eval` step (the chain's `eval:` node; llmlab/evaluation/compare.py): one lm-eval task set on the
  starting model and after every stage -> `eval_comparison.md` / `.png` ("did this stage help?").
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from llmlab.checks.settings import override_list
from llmlab.checkpointing.run_dir import open_logs
from llmlab.errors import PipelineError, fail, guard_hydra
from llmlab.evaluation.compare import run_eval_step
from llmlab.redact import redact, redact_logs, redact_text

log = logging.getLogger("llmlab.pipeline")

# summary.json keys worth comparing, per stage kind (first -> last)
HEADLINES = {
    "pretrain": ["val_loss", "val_ppl"],
    "sft": ["val_exact_match", "val_loss"],
    "rm": ["val_accuracy", "val_margin"],
    "dpo": ["val_reward_accuracy", "val_reward_margin", "val_exact_match"],
    "kto": ["val_reward_accuracy", "val_reward_margin", "val_kl", "val_exact_match"],
    "orpo": ["val_reward_accuracy", "val_reward_margin", "val_exact_match"],
    "simpo": ["val_reward_accuracy", "val_reward_margin", "val_exact_match"],
    "ppo": ["reward_mean", "kl", "val_reward_mean", "val_exact_match"],
    "grpo": ["reward_mean", "val_reward_mean", "val_exact_match"],
}


def _hf(run_dir: Path) -> Path:
    return run_dir / "hf"


def substitute(override: str, outputs: dict[str, str]) -> str:
    """`{name}` of an earlier stage -> its exported model dir; other braces are left alone."""
    return re.sub(r"\{([A-Za-z0-9_\-]+)\}", lambda m: outputs.get(m.group(1), m.group(0)), override)


def stage_finished(run_dir: Path, overrides: list[str]) -> bool:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        recorded = json.loads((run_dir / "pipeline_stage.json").read_text())
    except (OSError, ValueError):
        return False
    return (summary.get("status") == "finished" and recorded.get("overrides") == redact(overrides)
            and (_hf(run_dir) / "config.json").is_file())


def _error_of(run_dir: Path, stderr_tail: str) -> str:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") == "failed" and summary.get("error"):
            return summary["error"]
    except (OSError, ValueError):
        pass
    lines = [ln for ln in stderr_tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1].strip()


def run_stage(index: int, total: int, name: str, overrides: list[str], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llmlab.run", *overrides, f"hydra.run.dir={run_dir}"]
    log.info("[%d/%d] %s: %s", index, total, name, redact_text(" ".join(overrides)))
    (run_dir / "pipeline_stage.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "stage.log", "w") as out:
        out.write("$ " + redact_text(" ".join(cmd)) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (_hf(run_dir) / "config.json").is_file():
        tail = "\n".join((run_dir / "stage.log").read_text().splitlines()[-40:])
        reason = _error_of(run_dir, tail) if proc.returncode != 0 else "it exported no hf/ model"
        reason = reason.removeprefix("llmlab: error: ")
        raise PipelineError(f"stage {index}/{total} '{name}' failed (exit {proc.returncode}): {reason}; "
                            f"run dir: {run_dir} (log: {run_dir / 'stage.log'}); later stages were not run; fix "
                            f"the cause and run the same command again (finished stages are skipped)",
                            code=2 if proc.returncode == 2 else 1)
    (run_dir / "pipeline_stage.json").write_text(json.dumps({"name": name, "overrides": redact(overrides),
                                                             "seconds": round(time.perf_counter() - t0, 1)}) + "\n")


def stage_report(name: str, run_dir: Path | None, status: str, given: str | None = None) -> dict:
    """One stage's entry; a given stage that is a run dir (summary.json there) reports its metrics too."""
    entry = {"name": name, "status": status, "run_dir": str(run_dir) if run_dir else None}
    if given:
        entry["model"] = given
        if run_dir is None:
            return entry
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        return entry
    kind = summary.get("stage", name)
    entry.update(stage=kind, model=given or str(_hf(run_dir)), global_step=summary.get("global_step"),
                 wall_seconds=summary.get("wall_seconds"))
    metrics = {}
    for key in HEADLINES.get(kind, []):
        first, last = summary.get(f"{key}_first"), summary.get(f"{key}_last")
        if first is not None or last is not None:
            metrics[key] = {"first": first, "last": last}
    for key in ("val_accuracy", "val_reward_accuracy", "val_reward_margin", "kl_last"):
        if key in summary:
            metrics.setdefault(key, summary[key])
    entry["metrics"] = metrics
    return entry


def exact_match_by_stage(entries: list[dict]) -> dict:
    """{stage: {start, end, change}}: greedy held-out exact match of the model each stage started from and
    of the one it ended with, both on that stage's own held-out prompts (the validation before step 0 and
    the last one). `change` is what the stage did to the policy (an RL stage must not make it negative)."""
    out = {}
    for e in entries:
        em = (e.get("metrics") or {}).get("val_exact_match")
        if isinstance(em, dict) and em.get("last") is not None:
            start, end = em.get("first"), em["last"]
            out[e["name"]] = {"start": start, "end": end,
                              "change": None if start is None else round(end - start, 6)}
    return out


def write_summary(cfg, out_dir: Path, entries: list[dict], status: str) -> dict:
    policy_em = {}  # held-out exact match of each policy along the chain
    for e in entries:
        em = (e.get("metrics") or {}).get("val_exact_match")
        if isinstance(em, dict):
            if not policy_em:
                policy_em[f"before {e['name']}"] = em["first"]
            policy_em[e["name"]] = em["last"]
    by_stage = exact_match_by_stage(entries)
    summary = {"pipeline": cfg.pipeline.name, "status": status, "out_dir": str(out_dir), "stages": entries,
               "held_out_exact_match": policy_em, "held_out_exact_match_by_stage": by_stage}
    (out_dir / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# pipeline {cfg.pipeline.name}: {status}", "", "| stage | status | metric | first | last |",
             "|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else ("-" if v is None else str(v))  # noqa: E731
    for e in entries:
        rows = [(k, v) for k, v in (e.get("metrics") or {}).items()] or [("", None)]
        for i, (key, value) in enumerate(rows):
            first, last = (value.get("first"), value.get("last")) if isinstance(value, dict) else (None, value)
            lines.append(f"| {e['name'] if i == 0 else ''} | {e['status'] if i == 0 else ''} | {key} | "
                         f"{fmt(first)} | {fmt(last)} |")
    if policy_em:
        lines += ["", "Held-out exact match along the chain: "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in policy_em.items())]
    if by_stage:
        lines += ["", "Held-out exact match per stage (its start -> its end, on the stage's own held-out prompts): "
                  + ", ".join(f"{k} {fmt(v['start'])} -> {fmt(v['end'])}" for k, v in by_stage.items())]
    (out_dir / "pipeline_summary.md").write_text("\n".join(lines) + "\n")
    return summary


def pipeline_dir(cfg: DictConfig) -> Path:
    """Where the chain's stages go: `hydra.run.dir` (which defaults to `out_dir`), so both
    `out_dir=X` and `hydra.run.dir=X` put every stage under X."""
    chosen = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.out_dir
    return Path(chosen).expanduser().resolve()


def run_pipeline(cfg: DictConfig) -> dict:
    out_dir = pipeline_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.pipeline.stages)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"pipeline={cfg.pipeline.name}: stage names must be unique ({names})")
    given = {k: str(v) for k, v in (cfg.get("given") or {}).items()}
    if cfg.get("base"):
        base_stages = [s.name for s in stages if s.get("base_stage")]
        if not base_stages:
            raise PipelineError(f"base={cfg.base}: pipeline={cfg.pipeline.name} has no stage marked base_stage")
        given.setdefault(base_stages[0], str(cfg.base))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise PipelineError(f"given.{unknown[0]}: no such stage in pipeline={cfg.pipeline.name}; stages: "
                            f"{', '.join(names)}")
    for name, path in given.items():  # before anything runs: a typo'd dir must not cost earlier stages
        p = Path(path).expanduser()
        if not ((p / "hf" / "config.json").is_file() or (p / "config.json").is_file()):
            setting = "base" if cfg.get("base") and str(cfg.base) == path else f"given.{name}"
            raise PipelineError(f"{setting}={path}: no exported model there (config.json, or a run dir with "
                                f"hf/config.json); give a finished run dir or an HF model directory")
    common = override_list(cfg.get("overrides"), "overrides")
    per_stage = {k: override_list(v, f"stage_overrides.{k}") for k, v in (cfg.get("stage_overrides") or {}).items()}
    unknown = sorted(set(per_stage) - set(names))
    if unknown:
        raise PipelineError(f"stage_overrides.{unknown[0]}: no such stage in pipeline={cfg.pipeline.name}; "
                            f"stages: {', '.join(names)}")

    open_logs()  # the chain's checks passed: pipeline.log from here (a refused chain leaves none)
    outputs: dict[str, str] = {}
    entries: list[dict] = []
    upstream_ran = False
    try:
        for i, stage in enumerate(stages, 1):
            name = stage.name
            if name in given:
                path = Path(given[name]).expanduser()
                model = path / "hf" if (path / "hf" / "config.json").is_file() else path
                if not (model / "config.json").is_file():
                    raise PipelineError(f"given.{name}={path}: no exported model there (config.json)")
                outputs[name] = str(model.resolve())
                entries.append(stage_report(name, path if (path / "summary.json").is_file() else None, "given",
                                            outputs[name]))
                log.info("[%d/%d] %s: given %s", i, len(stages), name, outputs[name])
                continue
            run_dir = out_dir / f"{i}_{name}"
            overrides = [substitute(str(o), outputs) for o in stage.overrides] + common + per_stage.get(name, [])
            unresolved = [o for o in overrides if re.search(r"\{(%s)\}" % "|".join(map(re.escape, names)), o)]
            if unresolved:
                raise PipelineError(f"stage '{name}': {unresolved[0]!r} refers to a stage that does not come "
                                    f"before it in pipeline={cfg.pipeline.name}")
            if not cfg.rerun and not upstream_ran and stage_finished(run_dir, overrides):
                log.info("[%d/%d] %s: finished earlier, skipped (%s)", i, len(stages), name, run_dir)
                status = "skipped (finished earlier)"
            else:
                run_stage(i, len(stages), name, overrides, run_dir)
                upstream_ran, status = True, "finished"
            outputs[name] = str(_hf(run_dir))
            entries.append(stage_report(name, run_dir, status))
    except PipelineError:
        failed = len(entries)
        if failed < len(stages):
            name = stages[failed].name
            entries.append(stage_report(name, out_dir / f"{failed + 1}_{name}", "failed"))
            entries += [{"name": s.name, "status": "not run"} for s in stages[failed + 1:]]
        write_summary(cfg, out_dir, entries, "failed")
        raise
    summary = write_summary(cfg, out_dir, entries, "finished")

    summary["eval_comparison"] = run_eval_step(cfg, out_dir, entries)
    log.info("pipeline %s finished: %s", cfg.pipeline.name, out_dir / "pipeline_summary.md")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    try:
        summary = run_pipeline(cfg)
    except PipelineError as err:
        fail(err, code=err.code)
    print((Path(summary["out_dir"]) / "pipeline_summary.md").read_text())
    if summary.get("eval_comparison"):
        print((Path(summary["out_dir"]) / "eval_comparison.md").read_text())


if __name__ == "__main__":
    guard_hydra("pipeline")
    redact_logs()
    main()
