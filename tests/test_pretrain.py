"""The default job (stage=pretrain, tiny model, built-in data) end to end through the real CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, assert_ok

SUMMARY_KEYS = ["stage", "global_step", "train_loss_first", "train_loss_last", "val_loss_first", "val_loss_last",
                "val_ppl_first", "val_ppl_last", "tokens_per_sec", "peak_rss_mb", "wall_seconds", "total_params",
                "trainable_params", "precision", "strategy", "world_size", "run_dir"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from tests.conftest import run_cli

    run_dir = tmp_path_factory.mktemp("default")
    run = run_cli(run_dir, "trainer.max_steps=60", "trainer.val_check_interval=30", "data.n_train=2000",
                  "data.n_val=64", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=-1")
    assert_ok(run)
    return run


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_summary_has_every_key_and_loss_fell(default_run):
    s = default_run.summary
    assert [k for k in SUMMARY_KEYS if k not in s] == []
    assert s["stage"] == "pretrain" and s["global_step"] == 60 and s["world_size"] == 1
    assert s["val_loss_last"] < 0.8 * s["val_loss_first"]
    assert s["val_ppl_last"] < s["val_ppl_first"] / 2
    assert s["tokens_per_sec"] > 0 and s["total_params"] == s["trainable_params"] > 0


def initial_module(run_dir):
    """The stage module as `llmlab.train.train` builds it before fitting, from the run's resolved config:
    seed, tokenizer, data (its generation draws no torch randomness before the model, as there), model."""
    import lightning as L
    from omegaconf import OmegaConf

    from llmlab.stages.build import build_stage, stage_class
    from llmlab.data.datamodule import LLMDataModule
    from llmlab.models.build import build_tokenizer

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg.model)
    LLMDataModule(cfg.data, stage_class(cfg.stage).data_format, tokenizer, seed=cfg.seed).setup("fit")
    return build_stage(cfg, tokenizer)


def validation_loss(module, run_dir) -> float:
    """The run's validation (same data, same batches) on `module`, through Lightning."""
    import lightning as L
    from omegaconf import OmegaConf

    from llmlab.data.datamodule import LLMDataModule

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    dm = LLMDataModule(cfg.data, module.data_format, module.tokenizer, seed=cfg.seed)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=cfg.trainer.limit_val_batches)
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]


def test_run_outputs_exist(default_run):
    d = default_run.dir
    for name in ("config_resolved.yaml", "metrics.csv", "loss.png", "checkpoints/last.ckpt", "hf/config.json"):
        assert (d / name).exists(), name
    assert "sample |" in default_run.stderr + default_run.stdout or "samples" in default_run.summary
    header = (d / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "val/loss" in header


def test_parameters_changed_and_hf_export_round_trip(default_run, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = default_run.dir
    trained = AutoModelForCausalLM.from_pretrained(d / "hf").eval()
    tok = AutoTokenizer.from_pretrained(d / "hf")
    # what training started from, rebuilt as train.py builds it (the run's config and seed); it is
    # the start because it scores the run's own "before step 0" validation loss
    start = initial_module(d)
    assert validation_loss(start, d) == pytest.approx(default_run.summary["val_loss_first"], rel=1e-5)
    initial = dict(start.model.named_parameters())
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, initial[n])]
    assert len(changed) == len(list(trained.parameters()))
    # logits of hf/ equal the trained Lightning module's (weights from last.ckpt)
    ckpt = torch.load(d / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    module_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d / "hf"))
    module_model.load_state_dict(state, strict=False)
    module_model.tie_weights()
    module_model.eval()
    ids = tok(["the reverse of abc is", "dcba sorted is"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(trained(ids).logits, module_model(ids).logits, atol=1e-5)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_resume_continues_step_count_and_loss(cli, tmp_path):
    """Stopped at step 4 and resumed to 8 == an uninterrupted 8-step run (fp32, same seed)."""
    common = [*FAST, "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
    full = cli(*common, "trainer.max_steps=8", run_dir=tmp_path / "full")
    assert_ok(full)
    part_dir = tmp_path / "part"
    first = cli(*common, "trainer.max_steps=8", "stop_at_step=4", run_dir=part_dir)
    assert_ok(first)
    assert first.summary["global_step"] == 4
    resumed = cli(*common, "trainer.max_steps=8", "resume=auto", run_dir=part_dir)
    assert_ok(resumed)
    assert resumed.summary["global_step"] == 8
    full_hist = json.loads((tmp_path / "full" / "history.json").read_text())["train/loss"]
    res_hist = json.loads((part_dir / "history.json").read_text())["train/loss"]
    # the resumed run's steps 5..8 reproduce the uninterrupted run's steps 5..8
    # metrics.csv keeps the first part's rows too (Lightning's CSVLogger would delete them)
    import csv

    rows = list(csv.DictReader((part_dir / "metrics.csv").open()))
    logged_steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert min(logged_steps) < 4 < max(logged_steps), sorted(logged_steps)
    full_tail = {step: v for step, v in full_hist if step > 4}
    res_tail = {step: v for step, v in res_hist if step > 4}
    assert sorted(res_tail) == sorted(full_tail)
    # the history before the interruption travels in the checkpoint: history.json covers steps 1..8
    assert [step for step, _ in res_hist] == [step for step, _ in full_hist] == list(range(1, 9))
    for step, v in full_tail.items():
        assert res_tail[step] == pytest.approx(v, rel=1e-4), step


def test_ckpt_path_must_exist(cli):
    run = cli(*FAST, "ckpt_path=/nonexistent/last.ckpt")
    assert run.returncode == 2 and "ckpt_path" in run.stderr


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_bf16_precisions_train(cli, precision):
    run = cli(*FAST, f"precision={precision}")
    assert_ok(run)
    s = run.summary
    assert s["precision"] == precision and s["train_loss_last"] < s["train_loss_first"]


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_tensorboard_and_wandb_offline_loggers(cli):
    run = cli(*FAST, "logger=wandb", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert_ok(run)
    assert list(run.dir.glob("wandb/offline-run-*")), "no offline W&B run written"
    run = cli(*FAST, "logger=tensorboard")
    assert_ok(run)
    assert list((run.dir / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_nanogpt_shakespeare_recipe_runs(cli, tmp_path):
    """conf/experiment/nanogpt_shakespeare_char.yaml (bench/nanogpt_shakespeare.py's llmlab side) for a few
    steps on a small play in one .txt file: one document, its last 10% of tokens for validation."""
    text = "".join(f"Citizen {i}:\nWe are accounted poor citizens, the patricians good.\n\n" for i in range(60))
    (tmp_path / "play.txt").write_text(text)
    run = cli("experiment=nanogpt_shakespeare_char", f"data.train_files=[{tmp_path / 'play.txt'}]",
              "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
              env={"LLMLAB_CACHE": str(tmp_path / "cache")})
    assert_ok(run)
    s = run.summary
    assert s["status"] == "finished" and s["global_step"] == 4 and s["val_loss_last"] < s["val_loss_first"]
    cfg = json.loads((run.dir / "hf" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_positions"]) == (4, 128, 4, 64)
    assert cfg["activation_function"] == "gelu"  # nanoGPT's nn.GELU()
