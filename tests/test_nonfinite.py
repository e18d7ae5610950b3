"""The non-finite guard: a NaN/inf update is skipped on all ranks together, counted, and a streak of
them stops the run (`status: diverged`, exit 1) with finite weights in every checkpoint.

NaN is injected for real (`llmlab.callbacks.faults.InjectNaN`: a chosen rank's logits times NaN, so
loss and gradients go NaN) through the real CLI, one process per stage and 2 processes under ddp,
zero2 and zero3 with the fault on one rank only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, assert_ok, run_module

NAN = "+callbacks.nan._target_=llmlab.callbacks.faults.InjectNaN"
QUICK = ["callbacks.samples.prompts=[]", "callbacks.hf_export=null", "trainer.log_every_n_steps=1"]
# FAST: 6 steps, validation + checkpoint every 3 steps
STAGES = {
    "sft": ["stage=sft", "model=tiny", *FAST],
    "rm": ["stage=rm", "model=tiny", *FAST],
    "dpo": ["stage=dpo", "model=tiny", *FAST],
    "ppo": ["stage=ppo", "model=tiny", *FAST, "stage.module.mini_batch_size=8", "stage.module.ppo_epochs=1",
            "stage.module.samples_per_prompt=1", "stage.module.group_baseline=false", "data.batch_size=8"],
}


def _tensors(obj, prefix: str = ""):
    """Every tensor inside a loaded checkpoint object (dicts, lists), with a path-like name."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_files(path: Path) -> list[Path]:
    """A Lightning checkpoint file, or every file of DeepSpeed's checkpoint directory (model states and
    each rank's optimizer states: under ZeRO-3 the weights live in the fp32 partitions there)."""
    path = Path(path)
    if path.is_dir():
        tag = (path / "latest").read_text().strip()
        return sorted((path / tag).glob("*.pt"))
    return [path]


def checkpoint_step(path: Path) -> int:
    return _load(checkpoint_files(path)[0])["global_step"]


def assert_finite(path: Path) -> None:
    """Every floating tensor of the model and optimizer (weights, moments, fp32 partitions) is finite."""
    n, bad = 0, []
    for file in checkpoint_files(path):
        for name, t in _tensors(_load(file)):
            if t.is_floating_point() and not name.startswith("/callbacks"):  # ModelCheckpoint's kth_value is inf
                n += 1
                if not torch.isfinite(t).all():
                    bad.append(f"{file.name}:{name}")
    assert n and not bad, f"non-finite tensors in {path}: {bad[:5]}"


def skipped_history(run_dir: Path) -> list[int]:
    """Optimizer steps (1-based) whose logged train/loss is NaN: the poisoned ones."""
    history = json.loads((Path(run_dir) / "history.json").read_text())
    return [s for s, v in history["train/loss"] if v is None or math.isnan(v)]


# ------------------------------------------------------------------------------------- unit


def _tiny_optimizer():
    from llmlab.optim import guard_optimizer, warmup_schedule

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = guard_optimizer(opt)
    sched = warmup_schedule(opt, total_steps=10)  # LR schedulers re-wrap optimizer.step: must still work
    return model, opt, guard, sched


def _backward(model, poison: float | None = None):
    model.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    if poison is not None:
        model.bias.grad[0] = poison  # one element of one gradient


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_guarded_optimizer_skips_non_finite_update_and_keeps_state(poison):
    model, opt, guard, sched = _tiny_optimizer()
    _backward(model)
    opt.step()  # a normal step: weights move, Adam state exists
    sched.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}

    _backward(model, poison)
    opt.step()
    assert guard.skipped == 1 and guard.bad_streak == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # no update at all, not even to the finite parameters
    for p, s in opt.state.items():  # moments and step count untouched: a true skip
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state[id(p)][k])), k

    _backward(model)  # finite again: steps normally, the streak ends
    opt.step()
    assert guard.skipped == 1 and guard.bad_streak == 0
    assert not torch.equal(model.weight, weights["weight"])
    assert int(opt.state[model.weight]["step"]) == 2


def test_guard_counts_a_non_finite_loss_and_decides_once_per_step():
    """A NaN loss spoils the step even if its gradients were finite; within a step window (ZeRO calls
    the base step once per parameter group) the first decision holds and the step counts once."""
    model, opt, guard, _ = _tiny_optimizer()
    guard.note_loss(torch.tensor(float("nan")))
    guard.begin_step()
    _backward(model)
    before = model.weight.clone()
    opt.step()
    opt.step()  # a second group's call in the same step
    assert guard.end_step() is True
    assert guard.skipped == 1 and torch.equal(model.weight, before)
    guard.begin_step()
    opt.step()  # first group: finite, decided "apply"
    applied = model.weight.clone()
    model.weight.grad[0, 0] = float("nan")  # a later group goes NaN: not applied, decision kept
    opt.step()
    assert guard.end_step() is False and guard.skipped == 1
    assert torch.equal(model.weight, applied) and torch.isfinite(model.weight).all()


# ------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_single_nan_step_is_skipped_and_run_finishes(cli, stage):
    """Every stage runs the guard (ppo: manual optimization): one poisoned step is skipped, the run
    goes on to max_steps, and the checkpoint holds finite weights."""
    run = cli(*STAGES[stage], *QUICK, NAN, "+callbacks.nan.step=2")
    assert_ok(run)
    s = run.summary
    assert s["status"] == "finished" and s["skipped_steps"] == 1, s
    assert s["global_step"] == 6  # the skipped step still counts (schedule, data position, resume)
    assert s["train_skipped_steps_last"] == 1.0
    if stage != "ppo":  # ppo logs per iteration, not train/loss per step
        assert skipped_history(run.dir) == [2]
    ckpt = run.dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(ckpt) == 6
    assert_finite(ckpt)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_nan_streak_stops_diverged_and_resume_from_last_good_checkpoint(cli, tmp_path):
    """NaN at every step from 5: steps 5-7 skipped, the run stops at step 7 with exit 1 and one error
    line; last.ckpt is still step 3's (no checkpoint at a skipped step), finite, and resumes."""
    run_dir = tmp_path / "streak"
    args = [*STAGES["sft"], *QUICK, "trainer.max_steps=10"]
    run = cli(*args, NAN, "+callbacks.nan.step=5", "+callbacks.nan.count=-1", run_dir=run_dir)
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("llmlab: error:")]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert errors == [f"llmlab: error: run diverged at step 7: 3 non-finite updates in a row from step 5 "
                      f"skipped (3 in all); last good checkpoint: {ckpt}"], run.stderr[-3000:]
    s = run.summary
    assert s["status"] == "diverged" and s["diverged_at_step"] == 7 and s["global_step"] == 7, s
    assert s["skipped_steps"] == 3 and s["bad_streak_start"] == 5
    assert s["last_good_checkpoint"] == str(ckpt)
    assert skipped_history(run_dir) == [5, 6, 7]
    assert checkpoint_step(ckpt) == 3  # the save due at step 6 (a skipped step) was not written
    assert_finite(ckpt)

    resumed = cli(*args, "resume=auto", run_dir=run_dir)  # e.g. after lowering the learning rate
    assert_ok(resumed)
    s = resumed.summary
    assert s["status"] == "finished" and s["global_step"] == 10 and s["skipped_steps"] == 0, s
    assert_finite(ckpt)


# ------------------------------------------------------------------------------------- 2 processes

TINY_PRETRAIN = ["stage=pretrain", "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2",
                 "trainer.enable_progress_bar=false", "trainer.val_check_interval=3", "trainer.limit_val_batches=0",
                 "trainer.num_sanity_val_steps=0", "data.n_train=200", "data.n_val=8", *QUICK,
                 "trainer.devices=2", "data.batch_size=4", NAN, "+callbacks.nan.rank=1"]


def _two_process(tmp_path, strategy: str, *overrides: str):
    from tests.support_matrix import launch

    return launch(tmp_path / strategy, [*TINY_PRETRAIN, f"strategy={strategy}", *overrides])


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_processes_nan_on_one_rank_skip_together(tmp_path, strategy):
    """NaN on rank 1 only, once: both ranks skip the same step (no hang) and the run finishes with
    the same losses as DDP (ZeRO-3 == DDP holds through a skipped step)."""
    result = _two_process(tmp_path, strategy, "trainer.max_steps=5", "+callbacks.nan.step=2")
    assert result.ok, result.describe()
    s = result.summary
    assert s["status"] == "finished" and s["skipped_steps"] == 1 and s["global_step"] == 5, s
    assert skipped_history(result.run_dir) == [2]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "update skipped on all ranks" in line]
    assert len(warnings) == 2, warnings  # one per rank: rank 0 skipped although its own loss was finite
    # under ZeRO-3 (fp32) DeepSpeed's own global-norm check drops the step before the base optimizer
    assert all(("by DeepSpeed's overflow check" in w) == (strategy == "zero3") for w in warnings), warnings
    assert_finite(result.run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.distributed
def test_two_processes_zero2_nan_streak_on_one_rank_diverges(tmp_path):
    """Without DeepSpeed's gradient norm (`compute_grad_norm=false`, no clipping) DeepSpeed calls the base
    optimizer once per parameter group with NaN fp32 partitions: the guard decides there, all-reduced."""
    result = _two_process(tmp_path, "zero2", "trainer.max_steps=8", "+callbacks.nan.step=4", "+callbacks.nan.count=-1",
                          "+strategy.config_overrides.zero_optimization.compute_grad_norm=false",
                          "trainer.gradient_clip_val=0")
    assert result.returncode == 1, result.describe()
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "update skipped on all ranks" in line]
    assert len(warnings) == 6 and not any("by DeepSpeed" in w for w in warnings), warnings
    assert sum(line.startswith("llmlab: error: run diverged at step 6") for line in result.stderr.splitlines()) == 1
    s = result.summary
    assert s["status"] == "diverged" and s["diverged_at_step"] == 6 and s["skipped_steps"] == 3, s
    ckpt = Path(s["last_good_checkpoint"])
    assert ckpt == result.run_dir / "checkpoints" / "last.ckpt" and checkpoint_step(ckpt) == 3
    assert_finite(ckpt)


@pytest.mark.slow
def test_multirun_records_a_diverged_job_and_goes_on(tmp_path):
    """A sweep job that diverges before any checkpoint: recorded (status diverged, no checkpoint, none
    written at its end), and the next job still runs; the sweep exits 0."""
    args = [*STAGES["sft"], *QUICK, NAN, "+callbacks.nan.step=2", "+callbacks.nan.count=-1,1"]
    proc = run_module("llmlab.run", "-m", *args, f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in (0, 1))
    assert first["status"] == "diverged" and first["diverged_at_step"] == 4 and first["last_good_checkpoint"] is None
    assert not (tmp_path / "0" / "checkpoints" / "last.ckpt").exists()
    assert second["status"] == "finished" and second["skipped_steps"] == 1 and second["global_step"] == 6
