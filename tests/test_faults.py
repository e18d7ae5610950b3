"""Faults, for real: `python -m llmlab.run` subprocesses killed with SIGKILL (the whole process group,
so Lightning's rank 1 dies too), then `resume=auto` in the same run dir.

- kill -9 at random moments (3 times) -> the resumed run ends at max_steps with the uninterrupted run's
  per-step losses and final weights (fp32): pretrain, sft, zero2 with 2 processes.
- 20 kills timed inside a save (llmlab.checkpointing.checkpoints' fault-injection pause: a real sleep at a named
  phase of a real save), each followed by a successful resume=auto.
- a truncated / garbage checkpoint: resume=auto falls back to the previous intact one and says so;
  ckpt_path=<it> is exit 2 with one line naming the file.
- a changed batch size / model / accumulation / devices on resume: exit 2 listing the keys, before any
  weights load, config_resolved.yaml unchanged; resume_allow accepts the acceptable ones.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, assert_ok, run_cli
from tests.support_matrix import clean_env

pytestmark = pytest.mark.slow

# a checkpoint after every optimizer step (every_n_train_steps follows val_check_interval), no
# validation, no samples/exports: the run is mostly saves and steps, so a random kill lands anywhere
QUICK = ["model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2", "trainer.max_steps=10",
         "trainer.val_check_interval=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "callbacks.samples.prompts=[]",
         "callbacks.hf_export=null", "data.n_train=200", "data.n_val=8"]
STAGES = {
    "pretrain": ["stage=pretrain", *QUICK],
    "sft": ["stage=sft", "model=tiny", *QUICK],
    "zero2": ["stage=pretrain", *QUICK, "strategy=zero2", "trainer.devices=2", "data.batch_size=4"],
}


def start(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m llmlab.run` in its own session (its process group holds every rank)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.{time.time_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "llmlab.run", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env={**clean_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL the run's whole process group; True when it was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def wait_for(cond, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None or cond(), f"run ended (rc {proc.returncode}) before the awaited moment"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def history(run_dir: Path) -> list[tuple[int, float]]:
    return [tuple(p) for p in json.loads((run_dir / "history.json").read_text())["train/loss"]]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of checkpoints/last.ckpt (a DeepSpeed directory: rank 0's full fp32 module)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():
        states = last / "checkpoint" / "mp_rank_00_model_states.pt"
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_run(resumed: Path, full: Path) -> None:
    """Same steps, same per-step train losses, same final weights as the uninterrupted run."""
    got, want = history(resumed), history(full)
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: {a} vs {b}"
    w_got, w_want = final_weights(resumed), final_weights(full)
    assert w_got.keys() == w_want.keys()
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------
# kill -9 at a random moment
# ------------------------------------------------------------------------------------------------


def save_id(path: Path) -> tuple | None:
    """Changes with every completed save: each one renames a new file/directory to last.ckpt."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize("kind", ["pretrain", "sft", pytest.param("zero2", marks=pytest.mark.distributed)])
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(tmp_path, kind):
    """3 SIGKILLs at random moments of training (after 2 or 3 of the process's saves, then a random
    fraction of the time between its last two saves: inside a step or inside a save), each run started
    with resume=auto; the final run ends at max_steps with the uninterrupted run's per-step losses and
    final weights."""
    overrides = [*STAGES[kind], "trainer.max_steps=16"]
    full = run_cli(tmp_path / "full", *overrides, env=clean_env())
    assert_ok(full)
    seed = int(os.environ.get("LLMLAB_FAULT_SEED", time.time_ns() % 10**6))
    run_dir, rng = tmp_path / "killed", random.Random(seed)
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_running = 0
    for _ in range(3):
        saves, fraction = rng.choice([2, 3]), rng.random()
        proc = start(run_dir, *overrides, "resume=auto")
        try:
            ids, times = {save_id(last)}, []
            while len(times) < saves and proc.poll() is None:
                if (now := save_id(last)) not in ids:
                    ids.add(now)
                    times.append(time.monotonic())
                time.sleep(0.005)
            if len(times) >= 2:
                time.sleep(fraction * (times[-1] - times[-2]))
        finally:
            killed_running += kill9(proc)
    assert killed_running == 3, f"every kill should land while the run trains (seed {seed})"
    resumed = run_cli(run_dir, *overrides, "resume=auto", env=clean_env())
    assert_ok(resumed)
    assert resumed.summary["global_step"] == 16
    assert_same_run(run_dir, tmp_path / "full")


# ------------------------------------------------------------------------------------------------
# 20 kills inside a save
# ------------------------------------------------------------------------------------------------


def test_twenty_kills_inside_a_save_each_resumes(tmp_path):
    """Each cycle: start with resume=auto (which must restore and train a step: the previous kill's
    successful resume), pause inside the first save at a phase (before writing / written but not
    renamed / between the two renames), SIGKILL there. Whatever the phase, the next resume finds an
    intact checkpoint, and the run ends with the uninterrupted run's losses and weights."""
    overrides = [*STAGES["pretrain"], "trainer.max_steps=24"]
    full = run_cli(tmp_path / "full", *overrides, env=clean_env())
    assert_ok(full)
    run_dir, marker = tmp_path / "killed", tmp_path / "in_save"
    phases = ["writing", "written", "swapping"]
    resumed_from = []
    for i in range(20):
        marker.unlink(missing_ok=True)
        env = {"LLMLAB_TEST_PAUSE_IN_SAVE": str(marker), "LLMLAB_TEST_PAUSE_PHASE": phases[i % 3]}
        proc = start(run_dir, *overrides, "resume=auto", env=env)
        try:
            wait_for(marker.exists, proc)
        finally:
            assert kill9(proc), "killed inside the save"
        ckpts = run_dir / "checkpoints"
        resumed_from.append(sorted(p.name for p in ckpts.iterdir()))
    # the final run resumes and finishes; 20 kills cost at most one step each
    last = run_cli(run_dir, *overrides, "resume=auto", env=clean_env())
    assert_ok(last)
    assert last.summary["global_step"] == 24
    assert any("last.ckpt.partial" in names for names in resumed_from), resumed_from  # the windows were hit
    assert any("last.ckpt" not in names for names in resumed_from), resumed_from
    assert_same_run(run_dir, tmp_path / "full")


# ------------------------------------------------------------------------------------------------
# corrupt checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step pretrain run with last.ckpt (step 4) and last.ckpt.prev (step 3)."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert_ok(run_cli(run_dir, *STAGES["pretrain"], "trainer.max_steps=4", env=clean_env()))
    return run_dir


def test_corrupt_last_checkpoint_falls_back_to_previous(finished_run, tmp_path):
    """last.ckpt truncated (a torn write): resume=auto says so and resumes from last.ckpt.prev (step 3);
    ckpt_path=<a garbage file> is exit 2 with one line naming it."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt.prev", weights_only=False)["global_step"] == 3
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    resumed = run_cli(run_dir, *STAGES["pretrain"], "trainer.max_steps=6", "resume=auto", env=clean_env())
    assert_ok(resumed)
    assert f"checkpoint {last} is incomplete or corrupt" in resumed.stderr + resumed.stdout
    assert f"resuming from {last}.prev" in resumed.stderr + resumed.stdout
    assert resumed.summary["global_step"] == 6
    # step 4 was redone from the step-3 checkpoint: history has steps 1..6 once each
    assert [s for s, _ in history(run_dir)] == [1, 2, 3, 4, 5, 6]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(len(data)))
    explicit = run_cli(tmp_path / "other", *STAGES["pretrain"], f"ckpt_path={garbage}", env=clean_env())
    assert explicit.returncode == 2, explicit.stderr[-2000:]
    error = explicit.stderr.strip().splitlines()[-1]
    assert error.startswith("llmlab: error: ckpt_path=") and str(garbage) in error and "corrupt" in error
    assert "Traceback" not in explicit.stderr


# ------------------------------------------------------------------------------------------------
# resume under a changed config
# ------------------------------------------------------------------------------------------------


def test_changed_config_on_resume_is_refused_before_loading(finished_run, tmp_path):
    """Changed batch size / model + accumulation / devices: exit 2, one line listing each `key: old -> new`,
    before the model is built, config_resolved.yaml unchanged. resume_allow accepts the batch size."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = (run_dir / "config_resolved.yaml").read_text()
    cases = [(["data.batch_size=8"], ["data.batch_size: 16 -> 8"]),
             (["trainer.accumulate_grad_batches=2", "model.config.n_layer=3"],
              ["model.config.n_layer: 2 -> 3", "trainer.accumulate_grad_batches: 1 -> 2",
               "model.config.n_layer cannot change", "resume_allow=[trainer.accumulate_grad_batches]"]),
             (["trainer.devices=2", "strategy=ddp"], ["world_size: 1 -> 2", "resume_allow=[world_size]"])]
    for change, keys in cases:
        refused = run_cli(run_dir, *STAGES["pretrain"], "trainer.max_steps=6", "resume=auto", *change, env=clean_env())
        assert refused.returncode == 2, refused.stderr[-2000:]
        error = refused.stderr.strip().splitlines()[-1]
        assert error.startswith("llmlab: error: resume from ") and "differs" in error
        for key in keys:
            assert key in error, error
        assert "trainable" not in refused.stdout + refused.stderr  # refused before the model was built
        assert (run_dir / "config_resolved.yaml").read_text() == config
    # the acceptable change goes through with resume_allow (and is recorded for the next resume)
    accepted = run_cli(run_dir, *STAGES["pretrain"], "trainer.max_steps=6", "resume=auto", "data.batch_size=8",
                       "resume_allow=[data.batch_size]", env=clean_env())
    assert_ok(accepted)
    assert accepted.summary["global_step"] == 6
    assert "accepted by resume_allow: data.batch_size: 16 -> 8" in accepted.stdout + accepted.stderr


def test_sampler_position_follows_consumed_samples_not_epoch_numbers():
    """In a run the sampler starts each iteration at the samples consumed so far (a function of the
    trainer's global step): after a second resume Lightning may end the restored epoch early and call
    set_epoch(1) on a fresh iteration; the order must continue exactly where training stopped."""
    from llmlab.data.datamodule import ResumableSampler

    full = list(ResumableSampler(10, seed=3, length=12))
    consumed = [7]
    resumed = ResumableSampler(10, seed=3, start=lambda: consumed[0], length=3)
    resumed.set_epoch(1)
    assert list(resumed) == full[7:10]
    consumed[0] = 9  # an "epoch" ended after 2 of its 3 samples: the next iteration goes on from 9
    assert list(resumed)[:3] == full[9:12]
    two_passes = ResumableSampler(10, seed=3, length=6)  # a fixed start: each pass continues the order
    assert list(two_passes) + list(two_passes) == full


# ------------------------------------------------------------------------------------------------
# FSDP checkpoints (FSDP itself needs CUDA: the checkpoint is written in its format on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP save in one process, on purpose
def test_fsdp_sharded_checkpoint_is_resumable_kind_and_exports(finished_run, tmp_path):
    """A sharded FSDP checkpoint as Lightning's FSDPStrategy.save_checkpoint lays it out (the module
    state under "model" in a torch.distributed.checkpoint directory, the rest in meta.pt), written
    with the real torch.distributed.checkpoint.save: resume=auto picks it, only strategy=fsdp may
    resume it, and `python -m llmlab.export` gathers it into the same weights as the file checkpoint."""
    import shutil

    from torch.distributed.checkpoint import save

    from llmlab.checkpointing.checkpoints import checkpoint_problem, find_resume_checkpoint, is_fsdp_checkpoint
    from llmlab.checks.strategy import check_checkpoint_for_strategy
    from llmlab.checkpointing.resume import stored_snapshot
    from llmlab.errors import ConfigError
    from llmlab.export import main as export_main

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    for p in last.parent.iterdir():
        p.unlink()
    weights = checkpoint.pop("state_dict")
    checkpoint.pop("optimizer_states")
    save({"model": {k: v.clone() for k, v in weights.items()}}, checkpoint_id=last)
    torch.save(checkpoint, last / "meta.pt")
    assert is_fsdp_checkpoint(last) and checkpoint_problem(last) is None
    assert find_resume_checkpoint(run_dir) == last
    check_checkpoint_for_strategy(last, "fsdp")
    with pytest.raises(ConfigError, match="sharded FSDP checkpoint directory"):
        check_checkpoint_for_strategy(last, "ddp")
    assert stored_snapshot(last)["world_size"] == 1  # the resume config check reads meta.pt
    assert export_main([str(run_dir), "--out", str(tmp_path / "export")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").state_dict()
    for key, value in weights.items():
        name = key.removeprefix("model.")
        if name in exported:
            torch.testing.assert_close(exported[name], value, msg=name)
