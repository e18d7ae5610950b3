"""`python -m llmlab.pipeline`: chains compose, run end to end at reduced steps, skip finished stages
when started again, stop at a failed stage with a clear message, and write a comparison summary."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llmlab.pipeline import stage_report, substitute, write_summary
from tests.conftest import CONF, FAST, run_module

# every stage at test size (model.config.* only matters for the stage built from scratch)
REDUCED = [*FAST, "stage.module.mini_batch_size=8", "stage.module.ppo_epochs=1", "stage.module.samples_per_prompt=1",
           "stage.module.group_baseline=false", "data.batch_size=8"]


def hydra_list(items) -> str:
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


REDUCED_OVERRIDES = "overrides=" + hydra_list(REDUCED[:-5])  # the ppo-only keys go to stage_overrides
PPO_ONLY = "+stage_overrides.ppo=" + hydra_list(REDUCED[-5:])


def pipeline(out_dir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # the eval step ("did this stage help?") on 16 documents per task: seconds per model
    return run_module("llmlab.pipeline", f"out_dir={out_dir}", "eval_overrides=['limit=16']", *args, timeout=timeout)


def pipeline_names():
    return sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("name", pipeline_names())
def test_pipeline_config_composes_and_refers_backwards(name):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pipeline", overrides=[f"pipeline={name}"])
    names = [s.name for s in cfg.pipeline.stages]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(cfg.pipeline.stages):
        refs = {r for o in stage.overrides for r in re.findall(r"\{(\w+)\}", str(o))}
        assert refs <= set(names[:i]), (stage.name, refs)
        # each stage's overrides compose as a run (paths stand in for the earlier stages' outputs)
        overrides = [substitute(str(o), {n: f"/tmp/{n}/hf" for n in names}) for o in stage.overrides]
        with initialize_config_dir(str(CONF), version_base="1.3"):
            run_cfg = compose("train", overrides=overrides)
        assert run_cfg.stage.name in ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")


def test_substitute_leaves_other_braces():
    assert substitute("model.pretrained={sft}", {"sft": "/x/hf"}) == "model.pretrained=/x/hf"
    assert substitute("data.prompt_template='Q: {prompt}'", {"sft": "/x"}) == "data.prompt_template='Q: {prompt}'"


def test_summary_records_each_policy_stages_held_out_exact_match(tmp_path):
    """The summary keeps, per policy stage, the EM of the model it started from and of the one it ended
    with (its own held-out prompts), also for a stage given as an existing run dir."""
    def run_dir(name, stage, first, last):
        d = tmp_path / name
        (d / "hf").mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"stage": stage, "status": "finished",
                                                    "val_exact_match_first": first, "val_exact_match_last": last}))
        return d

    sft, ppo = run_dir("sft", "sft", 0.0, 0.965), run_dir("ppo", "ppo", 0.97, 0.955)
    entries = [stage_report("sft", sft, "given", str(sft / "hf")), stage_report("ppo", ppo, "finished")]
    cfg = type("Cfg", (), {"pipeline": type("P", (), {"name": "rlhf"})})()
    summary = write_summary(cfg, tmp_path, entries, "finished")
    assert summary["held_out_exact_match"] == {"before sft": 0.0, "sft": 0.965, "ppo": 0.955}
    by_stage = summary["held_out_exact_match_by_stage"]
    assert by_stage["sft"] == {"start": 0.0, "end": 0.965, "change": 0.965}
    assert by_stage["ppo"]["start"] == 0.97 and by_stage["ppo"]["change"] == pytest.approx(-0.015)
    assert "ppo 0.97 -> 0.955" in (tmp_path / "pipeline_summary.md").read_text()
    assert json.loads((tmp_path / "pipeline_summary.json").read_text())["held_out_exact_match_by_stage"] == by_stage


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "rlhf"
    args = ("pipeline=rlhf", REDUCED_OVERRIDES, PPO_ONLY)
    first = pipeline(out, *args)
    return out, args, first


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_rlhf_pipeline_runs_end_to_end(rlhf_run):
    out, _, proc = rlhf_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["status"] == "finished"
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "sft", "rm", "ppo"]
    for i, name in enumerate(["pretrain", "sft", "rm", "ppo"], 1):
        run_dir = out / f"{i}_{name}"
        stage_summary = json.loads((run_dir / "summary.json").read_text())
        assert stage_summary["status"] == "finished" and stage_summary["stage"] == name
        assert (run_dir / "hf" / "config.json").is_file()
    # each stage consumed the previous stage's export
    sft_cfg = (out / "2_sft" / "config_resolved.yaml").read_text()
    assert f"pretrained: {out / '1_pretrain' / 'hf'}" in sft_cfg
    ppo_cfg = (out / "4_ppo" / "config_resolved.yaml").read_text()
    assert f"reward_model: {out / '3_rm' / 'hf'}" in ppo_cfg and f"pretrained: {out / '2_sft' / 'hf'}" in ppo_cfg
    metrics = {s["name"]: s.get("metrics", {}) for s in summary["stages"]}
    assert "val_accuracy" in metrics["rm"] and "reward_mean" in metrics["ppo"]
    assert "sft" in summary["held_out_exact_match"]
    assert "| rm |" in (out / "pipeline_summary.md").read_text()
    # the eval step: a row per causal-LM stage (rm is a classifier), each evaluated by lm-eval
    comparison = json.loads((out / "eval_comparison.json").read_text())
    assert [r["name"] for r in comparison["rows"]] == ["pretrain", "sft", "ppo"]
    assert all("llmlab_builtin_mc/acc" in r["metrics"] for r in comparison["rows"])
    table = (out / "eval_comparison.md").read_text()
    assert all(f"| {name} |" in table for name in ("pretrain", "sft", "ppo")) and "| rm |" not in table
    assert (out / "eval_comparison.png").stat().st_size > 0


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_restarting_skips_finished_stages(rlhf_run):
    out, args, first = rlhf_run
    assert first.returncode == 0
    stamps = {p: p.stat().st_mtime for p in out.glob("*/summary.json")}
    again = pipeline(out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("finished earlier, skipped") == 4  # Hydra logs to stdout
    assert {p: p.stat().st_mtime for p in out.glob("*/summary.json")} == stamps  # nothing re-ran
    stages = json.loads((out / "pipeline_summary.json").read_text())["stages"]
    assert all(s["status"].startswith("skipped") for s in stages)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_given_base_and_failed_stage_stops_the_chain(rlhf_run, tmp_path):
    """`base=` replaces pretraining; a failing stage names itself and stops; later stages do not run;
    the fixed command then resumes after the finished stages."""
    src, _, first = rlhf_run
    assert first.returncode == 0
    out = tmp_path / "rlhf_fail"
    bad = pipeline(out, "pipeline=rlhf", f"base={src / '1_pretrain'}", REDUCED_OVERRIDES, PPO_ONLY,
                   "+stage_overrides.rm=['data.block_size=100000']")
    assert bad.returncode == 2  # the stage refused a setting: a user error (llmlab.run exit 2)
    assert "stage 3/4 'rm' failed" in bad.stderr and "data.block_size" in bad.stderr
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [s["status"] for s in summary["stages"]][:1] == ["given"]
    assert summary["stages"][2]["status"] == "failed" and summary["stages"][3]["status"] == "not run"
    assert not (out / "4_ppo").exists()
    fixed = pipeline(out, "pipeline=rlhf", f"base={src / '1_pretrain'}", REDUCED_OVERRIDES, PPO_ONLY)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "sft: finished earlier, skipped" in fixed.stdout + fixed.stderr
    assert (out / "4_ppo" / "hf" / "config.json").is_file()


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_dpo_pipeline_from_a_given_sft(rlhf_run, tmp_path):
    src, _, first = rlhf_run
    assert first.returncode == 0
    out = tmp_path / "dpo"
    proc = pipeline(out, "pipeline=dpo", f"base={src / '2_sft'}", REDUCED_OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    dpo = summary["stages"][1]
    assert dpo["status"] == "finished" and "val_reward_accuracy" in dpo["metrics"]
    # the given SFT run dir reports its own record too (its summary.json)
    assert set(summary["held_out_exact_match"]) == {"before sft", "sft", "dpo"}
    assert set(summary["held_out_exact_match_by_stage"]) == {"sft", "dpo"}
    rows = json.loads((out / "eval_comparison.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["sft", "dpo"]  # the given sft, then the stage run here


def test_eval_step_rows_base_then_each_stage(tmp_path):
    """pipeline=dpo's eval step: base (the model the first stage started from) -> sft -> dpo, a markdown
    row each with the change from the row above; rlhf leaves rm out. (End to end: the pipeline tests above.)"""
    from omegaconf import OmegaConf

    from llmlab.evaluation.compare import comparison_markdown, eval_targets

    base = tmp_path / "base_hf"
    base.mkdir()
    run = tmp_path / "1_sft"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"model": {"init": "pretrained", "pretrained": str(base)}}),
                   run / "config_resolved.yaml")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("pipeline", overrides=["pipeline=dpo"])
    entries = [{"name": "sft", "status": "finished", "run_dir": str(run)},
               {"name": "dpo", "status": "skipped (finished earlier)", "run_dir": str(tmp_path / "2_dpo")}]
    targets = eval_targets(cfg, tmp_path, entries)
    assert [(t["name"], t["ran"]) for t in targets] == [("base", False), ("sft", True), ("dpo", False)]
    assert targets[0]["model"] == str(base) and targets[1]["model"] == str(run)
    rows = [{"name": t["name"], "model": t["model"], "metrics": {"mc/acc": v}} for t, v in zip(targets, [.25, .75, .8])]
    table = comparison_markdown("dpo", {"task_set": "builtin", "overrides": [], "rows": rows})
    assert "| base | 0.2500 |" in table and "| sft | 0.7500 (+0.5000) |" in table and "| dpo | 0.8000 (+0.0500) |" in table
    with initialize_config_dir(str(CONF), version_base="1.3"):
        rlhf = compose("pipeline", overrides=["pipeline=rlhf"])
    entries = [{"name": n, "status": "given" if n == "pretrain" else "finished", "model": "/m", "run_dir": f"/r/{n}"}
               for n in ("pretrain", "sft", "rm", "ppo")]
    assert [t["name"] for t in eval_targets(rlhf, tmp_path, entries)] == ["pretrain", "sft", "ppo"]


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_hydra_run_dir_is_where_the_chain_goes(rlhf_run, tmp_path):
    """`hydra.run.dir=X` (the spelling every other entry point takes) puts the chain in X, as out_dir=X."""
    src, _, first = rlhf_run
    assert first.returncode == 0
    out = tmp_path / "chosen"
    proc = run_module("llmlab.pipeline", "pipeline=dpo", f"hydra.run.dir={out}", "eval_overrides=['limit=16']",
                      f"+given.sft={src / '2_sft'}", f"+given.dpo={src / '2_sft'}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["out_dir"] == str(out.resolve()) and [s["status"] for s in summary["stages"]] == ["given"] * 2


@pytest.mark.slow
def test_rlhf_chain_ppo_keeps_its_sft_models_exact_match(tmp_path):
    """Issue 10 item 6: the rlhf chain's PPO (with the reward model the chain trains) must not make its
    SFT model worse on greedy held-out exact match. From the cached tiny-sft base (given, as a run dir) and
    the chain's own rm stage; PPO reduced to 10 of the chain's 25 iterations, where the conclusion already
    holds (conf/pipeline/rlhf.yaml): with stage=ppo's defaults 10 iterations took EM 0.955 -> 0.845; with
    the chain's settings 0.955 -> 0.95 (and over 25 iterations, seeds 1234 / 1: see rlhf.yaml). The margin
    0.03 is two paired standard errors of 200 held-out prompts' EM change at these settings. With this
    checkout's tiny-sft (EM 0.995) the start is 1.0 and stage=ppo's defaults also stay within the margin
    at test size (1.0 -> 0.995; bench/RESULTS.md): a guard, not a separation of old and new settings."""
    from llmlab.models.bases import ensure_base

    sft_run = Path(ensure_base("tiny-sft")).parent / "run"
    out = tmp_path / "rlhf"
    proc = pipeline(out, "pipeline=rlhf", f"base={ensure_base('tiny-pretrained')}", f"+given.sft={sft_run}",
                    "overrides=['trainer.enable_progress_bar=false']", "eval_overrides=['limit=16']",
                    "+stage_overrides.ppo=['trainer.max_steps=80','trainer.val_check_interval=40']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    em = summary["held_out_exact_match_by_stage"]
    assert em["sft"]["end"] > 0.9, em  # the given SFT run's record is kept
    assert em["ppo"]["start"] > 0.9 and em["ppo"]["end"] >= em["ppo"]["start"] - 0.03, em
    assert summary["held_out_exact_match"]["ppo"] == em["ppo"]["end"]


@pytest.mark.slow
def test_grpo_chain_keeps_its_sft_models_exact_match(tmp_path):
    """pipeline=grpo (sft -> grpo, task reward) from the cached tiny-sft base given as the SFT run: the GRPO
    stage ends within 0.03 of its start's greedy held-out EM, and the summary records both policies. Reduced
    to 20 of the stage's 500 rollouts (its full runs: conf/pipeline/grpo.yaml)."""
    from llmlab.models.bases import ensure_base

    sft_run = Path(ensure_base("tiny-sft")).parent / "run"
    out = tmp_path / "grpo"
    proc = pipeline(out, "pipeline=grpo", f"base={sft_run}", "overrides=['trainer.enable_progress_bar=false']",
                    "eval_overrides=['limit=16']",
                    "+stage_overrides.grpo=['trainer.max_steps=20','trainer.val_check_interval=20']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft", "grpo"]
    em = summary["held_out_exact_match_by_stage"]
    assert em["sft"]["end"] > 0.9 and em["grpo"]["start"] > 0.9, em
    assert em["grpo"]["end"] >= em["grpo"]["start"] - 0.03, em
    assert "reward_mean" in summary["stages"][1]["metrics"]
    rows = json.loads((out / "eval_comparison.json").read_text())["rows"]  # lm-eval before and after grpo
    assert [r["name"] for r in rows] == ["sft", "grpo"]
