"""Distributed runs of the real `python -m llmlab.run` on 2 CPU processes (gloo): invariants, ZeRO-3
exports and adapters, resume, validation generation and PPO rollouts under ZeRO-3, torchrun.

Each run is a subprocess with a clean environment (no inherited launcher variables) and one thread per
process; runs are shared between tests through a session cache. What is compared is what users see:
`history.json` (train/loss per optimizer step: the mean over micro-batches and ranks, see
`llmlab.stages.common.log_train`), `summary.json`, `hf/`, `hf_adapter/` and the checkpoints.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support_matrix import Result, launch

pytestmark = pytest.mark.distributed

# the tiny GPT-2 (2 layers, 32 wide), fp32, 6 steps: small enough for ~20 s per 2-process run here
TINY = ["model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
NO_CKPT = ["callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false"]
NO_EXTRAS = ["callbacks.samples.prompts=[]", "callbacks.hf_export=null"]
SAMPLES = ["callbacks.samples.prompts=[the reverse of cab is,dcba sorted is]", "callbacks.samples.max_new_tokens=8"]
PRETRAIN = ["stage=pretrain", *TINY, *QUIET, "trainer.max_steps=6", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "data.n_train=200", "data.n_val=8"]
TWO = ["trainer.devices=2", "data.batch_size=4"]  # 2 processes x 4 = 8 samples per optimizer step

_RUNS: dict[tuple, Result] = {}


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llmlab_dist")


def run(root: Path, name: str, *overrides: str, launcher: str = "lightning") -> Result:
    """One llmlab.run per (name, overrides) per session; fails the test unless it exits 0."""
    key = (name, overrides, launcher)
    if key not in _RUNS:
        _RUNS[key] = launch(root / name, list(overrides), launcher=launcher)
    result = _RUNS[key]
    assert result.ok, result.describe()
    return result


def built_once(base: str) -> None:
    """Build a cached tiny base (llmlab/models/bases.py) here, without a time limit, before a run starts from it:
    after a code change the first run to need one builds it (several minutes at one thread: tiny-pretrained, then
    the SFT run on it), which a run's RUN_TIMEOUT_S (there to catch hangs) must not have to cover."""
    from llmlab.models.bases import ensure_base

    ensure_base(base)


def losses(result: Result, key: str = "train/loss") -> list[float]:
    points = result.losses(key)
    assert [s for s, _ in points] == list(range(1, len(points) + 1)), points  # one value per optimizer step
    return [v for _, v in points]


def assert_close(actual: list[float], expected: list[float], rel: float = 1e-3) -> None:
    assert len(actual) == len(expected) > 0, (actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert math.isclose(a, e, rel_tol=rel), f"step {step}: {a} vs {e}\n{actual}\n{expected}"


def ddp_run(root):
    return run(root, "ddp", *PRETRAIN, *TWO, "strategy=ddp", *SAMPLES, *NO_CKPT)


def zero3_run(root):
    return run(root, "zero3", *PRETRAIN, *TWO, "strategy=zero3", *SAMPLES, *NO_CKPT)


def auto8_run(root):
    return run(root, "auto8", *PRETRAIN, "strategy=auto", "data.batch_size=8", *NO_EXTRAS, *NO_CKPT)


# ------------------------------------------------------------------------------------------------
# Invariants (fp32, same seed and data)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("zero", "launcher"), [("zero1", "torchrun"), ("zero2", "lightning"), ("zero3", "lightning")])
def test_zero_stages_equal_ddp(runs_root, zero, launcher):
    """The first 6 optimizer-step losses of ZeRO 1/2/3 equal DDP's within 1e-3 (measured: ~1e-7).
    zero1 is started by torchrun (TorchElasticEnvironment): no code change for that launcher."""
    ddp = ddp_run(runs_root)
    if zero == "zero3":
        result = zero3_run(runs_root)
    else:
        result = run(runs_root, zero, *PRETRAIN, *TWO, f"strategy={zero}", *NO_EXTRAS, *NO_CKPT, launcher=launcher)
    assert_close(losses(result), losses(ddp))
    summary = result.summary
    assert summary["world_size"] == 2 and summary["strategy"] == zero and summary["global_step"] == 6


def test_chunked_loss_under_zero3_equals_ddp(runs_root):
    """`stage.module.loss_chunk_tokens` under ZeRO-3: the output layer (its weight partitioned, gathered by
    DeepSpeed's hooks) runs once per chunk and again in backward (each chunk's recompute); the losses still
    equal DDP's full-logits run."""
    result = run(runs_root, "zero3_chunked", *PRETRAIN, *TWO, "strategy=zero3", "stage.module.loss_chunk_tokens=37",
                 *NO_EXTRAS, *NO_CKPT)
    assert_close(losses(result), losses(ddp_run(runs_root)))


def test_ddp_two_by_four_equals_auto_one_by_eight(runs_root):
    """2 processes x per-device batch 4 == 1 process x batch 8: the sampler gives the ranks the same 8
    samples per step (global positions r, r+2, ...), and train/loss is the mean over ranks."""
    ddp = ddp_run(runs_root)
    single = auto8_run(runs_root)
    assert single.summary["world_size"] == 1
    assert_close(losses(ddp), losses(single))


def test_accumulation_keeps_the_loss_scale(runs_root):
    """batch 8 x accumulation 1 == batch 4 x accumulation 2: same samples per optimizer step, same
    updates, and the logged loss is the optimizer step's (the micro-batch mean), not the last
    micro-batch's. Also under ZeRO-3, where DeepSpeed does the accumulation (2 ranks x 2 x 2)."""
    single = auto8_run(runs_root)
    accumulated = run(runs_root, "auto4x2", *PRETRAIN, "strategy=auto", "data.batch_size=4",
                      "trainer.accumulate_grad_batches=2", *NO_EXTRAS, *NO_CKPT)
    assert_close(losses(accumulated), losses(single))
    zero3_acc = run(runs_root, "zero3_2x2x2", *PRETRAIN, "strategy=zero3", "trainer.devices=2",
                    "data.batch_size=2", "trainer.accumulate_grad_batches=2", *NO_EXTRAS, *NO_CKPT)
    assert_close(losses(zero3_acc), losses(single))


def test_two_nodes_by_torchrun_equal_one_node_of_two(runs_root):
    """Multi-node with no code change: two torchrun agents (`--nnodes 2 --node-rank 0/1`, one process
    each; two "nodes" on this machine) and `trainer.num_nodes=2 trainer.devices=1` give the global ranks,
    data shards and losses of one node with 2 processes."""
    import socket
    import subprocess
    import sys
    import time

    from tests.support_matrix import ROOT, clean_env

    ddp = ddp_run(runs_root)
    run_dir = runs_root / "two_nodes"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [*PRETRAIN, "strategy=ddp", "trainer.num_nodes=2", "trainer.devices=1", "data.batch_size=4",
                 *NO_EXTRAS, *NO_CKPT, f"hydra.run.dir={run_dir}"]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "llmlab.run", *overrides],
        cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for node in (0, 1)]
    t0, outputs = time.time(), []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=max(1, 300 - (time.time() - t0)))[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                import os
                import signal

                os.killpg(agent.pid, signal.SIGKILL)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    result = Result(0, outputs[0], "", time.time() - t0, run_dir)
    assert result.summary["world_size"] == 2 and result.summary["global_step"] == 6
    assert_close(losses(result), losses(ddp))


def test_summary_once_with_world_size_and_global_tokens(runs_root):
    ddp, single = ddp_run(runs_root), auto8_run(runs_root)
    assert ddp.summary["world_size"] == 2 and ddp.summary["status"] == "finished"
    # tokens/s counts every rank's tokens: the timed token count equals the single process's
    assert ddp.summary["train_tokens_timed"] == single.summary["train_tokens_timed"]
    assert not list(ddp.run_dir.glob("summary*.json"))[1:]  # one summary, written by rank 0


# ------------------------------------------------------------------------------------------------
# ZeRO-3: exports, samples, LoRA adapter
# ------------------------------------------------------------------------------------------------


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_zero3_hf_export_is_complete_and_equals_ddp(runs_root):
    """hf/ of a ZeRO-3 run holds the full trained weights (collective gathered save): the same tensors
    as the DDP run's hf/, and it loads with from_pretrained with no missing weights."""
    import torch
    from transformers import AutoModelForCausalLM

    ddp, zero3 = ddp_run(runs_root), zero3_run(runs_root)
    z, d = _safetensors(zero3.run_dir / "hf"), _safetensors(ddp.run_dir / "hf")
    assert z.keys() == d.keys() and z
    for k in d:
        assert z[k].shape == d[k].shape and z[k].numel() > 0, k
        assert torch.allclose(z[k], d[k], atol=1e-5), k
    model, info = AutoModelForCausalLM.from_pretrained(zero3.run_dir / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = AutoModelForCausalLM.from_pretrained(ddp.run_dir / "hf")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-4)


def test_zero3_samples_equal_ddp(runs_root):
    """End-of-training samples under ZeRO-3 are generated on every rank with gathered weights: the same
    text as DDP's (the bug this guards: blank samples from partitioned, empty weights)."""
    ddp, zero3 = ddp_run(runs_root), zero3_run(runs_root)
    assert zero3.summary["samples"] == ddp.summary["samples"]
    assert len(zero3.summary["samples"]) == 2


def test_lora_adapter_under_zero3_is_the_trained_adapter(runs_root, tiny_pretrained_dir):
    """peft=lora strategy=zero3: hf_adapter/ equals the adapter gathered from the ranks' ZeRO-3 shards
    (the DeepSpeed checkpoint of the same step), differs from its initialisation (lora_B starts at 0),
    and hf/ is the complete merged model: it loads, and its logits equal base + saved adapter."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    result = run(runs_root, "lora_zero3", *PRETRAIN, *TWO, "strategy=zero3", "peft=lora", "peft.dropout=0.0",
                 "model.init=pretrained", f"model.pretrained={tiny_pretrained_dir}",
                 "callbacks.samples.prompts=[]", "trainer.max_steps=4", "trainer.val_check_interval=4")
    ckpt = result.run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), "DeepSpeed checkpoints are directories"
    gathered = {k.removeprefix("model."): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}
    saved = _safetensors(result.run_dir / "hf_adapter")
    lora = {k: v for k, v in gathered.items() if ".lora_" in k}
    assert lora and {k.replace(".default.", ".") for k in lora} == set(saved)
    for key, value in lora.items():
        on_disk = saved[key.replace(".default.", ".")]
        assert on_disk.numel() > 0 and torch.equal(on_disk, value), key
        if ".lora_B." in key:
            assert on_disk.abs().sum() > 0, f"{key} is still its zero initialisation"

    # hf/: the merged model == the base (from the checkpoint) with the saved adapter applied
    from llmlab.stages.build import build_stage
    from llmlab.models.build import build_tokenizer

    cfg = OmegaConf.load(result.run_dir / "config_resolved.yaml")
    module = build_stage(cfg, build_tokenizer(cfg.model))
    missing = set(module.model.state_dict()) - set(gathered)
    assert not missing, sorted(missing)[:5]
    module.model.load_state_dict({k: gathered[k] for k in module.model.state_dict()})
    module.model.eval()
    merged, info = AutoModelForCausalLM.from_pretrained(result.run_dir / "hf", output_loading_info=True)
    assert not info["missing_keys"], info
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, module.model(input_ids=ids).logits, atol=1e-5)

    # `python -m llmlab.export RUN_DIR` reads the DeepSpeed checkpoint directory (the adapter; the frozen
    # base comes from model.pretrained): the same merged model as hf/
    from tests.conftest import run_module

    out = result.run_dir / "export"
    proc = run_module("llmlab.export", str(result.run_dir), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, merged(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_resume_continues_step_count_and_loss(runs_root, strategy):
    """Stopped at step 3 (`stop_at_step`), resumed with `resume=auto` in the same run dir: steps 4..6
    reproduce the uninterrupted run's, and history.json covers 1..6. Under zero3 the checkpoint is a
    DeepSpeed directory (checkpoints/last.ckpt/) holding each rank's shards."""
    full = ddp_run(runs_root) if strategy == "ddp" else zero3_run(runs_root)
    common = [*PRETRAIN, *TWO, f"strategy={strategy}", *NO_EXTRAS, *NO_CKPT]
    first = run(runs_root, f"resume_{strategy}", *common, "stop_at_step=3")
    assert first.summary["global_step"] == 3
    ckpt = first.run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() if strategy == "zero3" else ckpt.is_file()
    resumed = run(runs_root, f"resume_{strategy}", *common, "resume=auto")
    assert resumed.summary["global_step"] == 6
    assert_close(losses(resumed), losses(full), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Generation inside validation (SFT) and rollouts (PPO) under ZeRO-3
# ------------------------------------------------------------------------------------------------

SFT = ["stage=sft", "model=tiny_sft", *QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2",
       "trainer.limit_val_batches=2", "data.n_train=64", "data.n_val=16", "data.batch_size=4",
       "data.val_batch_size=4", *NO_EXTRAS, *NO_CKPT]


def test_sft_validation_generation_under_zero3_equals_ddp(runs_root):
    """stage=sft validates with greedy generation (exact match) before step 0 and at step 2; under
    ZeRO-3 (synchronised generation across ranks) it finishes and gives DDP's numbers."""
    built_once("tiny-sft")
    ddp = run(runs_root, "sft_ddp", *SFT, "strategy=ddp", "trainer.devices=2")
    zero3 = run(runs_root, "sft_zero3", *SFT, "strategy=zero3", "trainer.devices=2")
    for key in ("val/exact_match", "val/loss"):
        z, d = zero3.losses(key), ddp.losses(key)
        assert [s for s, _ in z] == [s for s, _ in d] == [0, 2], (z, d)
        assert_close([v for _, v in z], [v for _, v in d], rel=1e-4)
    # the generated answers themselves (a few are kept in summary.json): same text, not blank
    z_pred, d_pred = zero3.summary.get("val_predictions"), ddp.summary.get("val_predictions")
    assert z_pred and d_pred, "summary.json lacks val_predictions"
    assert z_pred == d_pred and any(p["generated"].strip() for p in z_pred), (z_pred, d_pred)
    assert_close(losses(zero3), losses(ddp))


def test_ppo_steps_under_zero3_equal_ddp(runs_root):
    """stage=ppo under ZeRO-3 on 2 processes: sampled rollouts (ranks stopping at different lengths,
    generated on gathered weights), PPO updates (DeepSpeed clips with the stage's max_grad_norm) and
    validation finish without hanging, and give DDP's numbers (same seeds)."""
    from tests.support_matrix import available_stages

    if "ppo" not in available_stages():
        pytest.skip("stage=ppo not available yet")
    built_once("tiny-sft-early")
    common = ["stage=ppo", "trainer.devices=2", *QUIET, "trainer.max_steps=4", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "data.n_train=64", "data.n_val=8", "data.batch_size=4",
              "data.val_batch_size=4", "stage.module.mini_batch_size=4", "stage.module.ppo_epochs=2",
              "stage.module.samples_per_prompt=1", "stage.module.group_baseline=false", *NO_EXTRAS, *NO_CKPT]
    zero3 = run(runs_root, "ppo_zero3", *common, "strategy=zero3")
    ddp = run(runs_root, "ppo_ddp", *common, "strategy=ddp")
    assert zero3.summary["global_step"] == 4 and zero3.summary["world_size"] == 2
    for key in ("train/reward_mean", "train/policy_loss", "train/value_loss", "train/kl", "val/reward_mean"):
        z, d = zero3.losses(key), ddp.losses(key)
        assert len(z) == len(d) >= 2 and [s for s, _ in z] == [s for s, _ in d], (key, z, d)
        for (_, a), (_, b) in zip(z, d):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (key, z, d)


# ------------------------------------------------------------------------------------------------
# QLoRA x ZeRO-3 (the headline combination, tiny)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved with save_pretrained (64 wide: bitsandbytes' 4-bit blocks are 64 values)."""
    from omegaconf import OmegaConf

    from llmlab.models.build import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny64")
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml")
    cfg.config.update(n_layer=2, n_embd=64, n_head=2)
    tok = build_tokenizer(cfg)
    build_model(cfg, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_qlora_under_zero3_matches_one_process(runs_root, tiny_pretrained_dir):
    """peft=qlora strategy=zero3 with no extra flag (4-bit weights stored as bf16 automatically, so
    DeepSpeed can partition them): the losses of 2 processes x 4 equal one process x 8 (bf16-true, so
    within 1e-2), and the run exports an adapter and a merged hf/ with real weights."""
    common = ["stage=sft", "model=tiny", "model.init=pretrained", f"model.pretrained={tiny_pretrained_dir}",
              "peft=qlora", "precision=bf16-true", *QUIET, "trainer.max_steps=3", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "data.n_train=64", "data.n_val=8", "callbacks.samples.prompts=[]",
              *NO_CKPT]
    zero3 = run(runs_root, "qlora_zero3", *common, "strategy=zero3", *TWO)
    single = run(runs_root, "qlora_auto", *common, "strategy=auto", "data.batch_size=8")
    resolved = (zero3.run_dir / "config_resolved.yaml").read_text()
    assert "quant_storage: null" in resolved  # nothing set by hand: the builder chose bfloat16
    assert_close(losses(zero3), losses(single), rel=1e-2)
    adapter = _safetensors(zero3.run_dir / "hf_adapter")
    merged = _safetensors(zero3.run_dir / "hf")
    assert adapter and merged and all(t.numel() > 0 for t in [*adapter.values(), *merged.values()])


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_grpo_under_deepspeed_equals_ddp(runs_root, strategy):
    """stage=grpo on 2 processes: each rank samples its own groups (generation on gathered weights under
    ZeRO-3, ranks stopping at different lengths), the loss normalisers are all-reduced, and the KL
    reference is kept (beta > 0). ZeRO-2/3 give DDP's rewards, losses and KL (same seeds)."""
    common = ["stage=grpo", "trainer.devices=2", *QUIET, "trainer.max_steps=4", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "data.n_train=64", "data.n_val=8", "data.batch_size=2",
              "data.val_batch_size=4", "stage.module.num_generations=4", "stage.module.mini_batch_size=4",
              "stage.module.max_completion_length=6", "stage.module.beta=0.04", "stage.module.loss_type=bnpo",
              *NO_EXTRAS, *NO_CKPT]
    built_once("tiny-sft-early")
    ddp = run(runs_root, "grpo_ddp", *common, "strategy=ddp")
    ds = run(runs_root, f"grpo_{strategy}", *common, f"strategy={strategy}")
    assert ds.summary["global_step"] == ddp.summary["global_step"] == 4 and ds.summary["world_size"] == 2
    for key in ("train/reward_mean", "train/loss", "train/kl", "val/exact_match"):
        z, d = ds.losses(key), ddp.losses(key)
        assert len(z) == len(d) >= 2 and [s for s, _ in z] == [s for s, _ in d], (key, z, d)
        for (_, a), (_, b) in zip(z, d):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (key, z, d)
