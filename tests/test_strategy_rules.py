"""Strategies, the fast tier (no process spawned): every conf/strategy choice composes and builds,
DeepSpeed options and "auto" buffer sizes, the strategy rules of llmlab.checks (FSDP on CPU, cpu_bf16,
fp16 on CPU, QLoRA storage, checkpoint kinds), the ZeRO-3 helpers as no-ops on one process, per-rank
seeding and per-step logging. The real 2-process DDP / DeepSpeed runs are in tests/test_strategy_runs.py,
which imports this file's helpers (`strategy_node`, `tiny_gpt2`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.errors import StrategyConfigError

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "conf" / "strategy"
VOCAB, SEQ = 256, 32


def strategy_node(name: str, accelerator: str = "cpu"):
    """conf/strategy/<name>.yaml as composed, under a root with trainer.accelerator (its interpolations resolve)."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_group  # zero2|3|3_offload compose zero1.yaml: not a plain load

    root = OmegaConf.create({"trainer": {"accelerator": accelerator}, "strategy": compose_group("strategy", name)})
    return root.strategy


def tiny_gpt2():
    """GPT-2, 2 layers x 32, vocabulary VOCAB, no dropout: what the strategy runs train."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ * 2, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config)


ALL_CHOICES = ["auto", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "cpu_bf16", "fsdp"]


def test_every_choice_has_a_file_with_its_name():
    from tests.conftest import compose_group

    assert sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml")) == sorted(ALL_CHOICES)
    for choice in ALL_CHOICES:
        node = compose_group("strategy", choice)
        assert node.name == choice
        assert node._target_.startswith("llmlab.distributed.strategies.")


@pytest.mark.parametrize("choice", [c for c in ALL_CHOICES if c != "fsdp"])
def test_nodes_instantiate(choice):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from llmlab.distributed.strategies import CPUDeepSpeedStrategy

    strategy = instantiate(strategy_node(choice))
    expected = {"auto": str, "ddp": DDPStrategy, "cpu_bf16": SingleDeviceStrategy}.get(choice, CPUDeepSpeedStrategy)
    assert isinstance(strategy, expected)
    if isinstance(strategy, DeepSpeedStrategy):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(choice[4])
        assert ("offload_optimizer" in zero) == ("offload_param" in zero) == (choice == "zero3_offload")


def test_deepspeed_options_pass_through_and_overrides_merge():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = strategy_node("zero2")
    node.reduce_bucket_size = 12345
    node.overlap_comm = False
    node.config_overrides = OmegaConf.create({"zero_optimization": {"sub_group_size": 777}, "wall_clock_breakdown": True})
    strategy = instantiate(node)
    zero = strategy.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345 and zero["overlap_comm"] is False
    assert zero["sub_group_size"] == 777 and zero["stage"] == 2  # merged key by key, not replaced
    assert strategy.config["wall_clock_breakdown"] is True
    assert isinstance(strategy.config["zero_optimization"], dict)  # plain dicts for DeepSpeed, not DictConfig


def test_auto_buffer_sizes_follow_the_model_as_hf_trainer_auto():
    """zero1/2/3 ship `reduce_bucket_size: auto` and zero3 its prefetch bucket, persistence threshold, live
    parameters and re-use distance: hidden^2, 0.9 hidden^2, 10 hidden, 10 hidden^2 and 10 hidden^2 elements
    once the model is known (the first three as the HF Trainer's "auto");
    a number given wins; a model without a hidden size is refused with the setting to change."""
    import torch
    from hydra.utils import instantiate
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmlab.errors import StrategyConfigError
    from llmlab.distributed.strategies import fill_auto_sizes
    from llmlab.distributed.memory import hidden_size

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50, n_positions=16))
    assert hidden_size(model) == 64
    for choice in ("zero1", "zero2", "zero3", "zero3_offload"):
        strategy = instantiate(strategy_node(choice))
        fill_auto_sizes(strategy, hidden_size(model))
        zero = strategy.config["zero_optimization"]
        assert zero["reduce_bucket_size"] == 64 * 64, choice
        if choice.startswith("zero3"):
            assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64) and zero["stage3_param_persistence_threshold"] == 640
            assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10 * 64 * 64
        else:
            assert "stage3_prefetch_bucket_size" not in zero
    node = strategy_node("zero3")
    node.reduce_bucket_size = 12345
    strategy = instantiate(node)
    fill_auto_sizes(strategy, 64)
    assert strategy.config["zero_optimization"]["reduce_bucket_size"] == 12345
    with pytest.raises(StrategyConfigError, match="reduce_bucket_size, stage3_prefetch_bucket_size.*=auto.*hidden size"):
        fill_auto_sizes(instantiate(strategy_node("zero3")), hidden_size(torch.nn.Linear(2, 2)))


def test_offloading_parameters_needs_stage_3():
    from llmlab.errors import StrategyConfigError
    from llmlab.distributed.strategies import deepspeed

    with pytest.raises(StrategyConfigError, match="offload_parameters.*stage 3"):
        deepspeed(stage=2, offload_parameters=True)


def test_fsdp_on_cpu_is_refused_naming_the_fix():
    from hydra.utils import instantiate

    from llmlab.checks.strategy import check_fsdp, check_strategy

    with pytest.raises(StrategyConfigError, match=r"strategy=fsdp needs CUDA.*strategy=zero3.*trainer\.accelerator"):
        check_fsdp("cpu")
    with pytest.raises(StrategyConfigError, match="strategy=zero3"):
        check_fsdp("auto", cuda_available=False)
    with pytest.raises(StrategyConfigError, match="strategy=zero3"):
        check_strategy(strategy_node("fsdp"), accelerator="cpu")
    with pytest.raises(Exception, match="strategy=fsdp needs CUDA"):  # the yaml's builder refuses too
        instantiate(strategy_node("fsdp", accelerator="cpu"))
    check_fsdp("gpu", cuda_available=True)  # allowed where it can run


def test_cpu_bf16_checks():
    from llmlab.checks.strategy import check_strategy

    node = strategy_node("cpu_bf16")
    check_strategy(node, accelerator="cpu", precision="bf16-mixed")
    check_strategy(node, accelerator="auto", precision="bf16-true", cuda_available=False)
    with pytest.raises(StrategyConfigError, match="precision=bf16-mixed"):
        check_strategy(node, accelerator="cpu", precision="32-true")
    with pytest.raises(StrategyConfigError, match="trainer.accelerator=cpu"):
        check_strategy(node, accelerator="gpu", precision="bf16-mixed", cuda_available=True)
    with pytest.raises(StrategyConfigError, match="trainer.devices=1"):
        check_strategy(node, accelerator="cpu", precision="bf16-mixed", devices=2)


def test_cpu_bf16_selects_bf16_precision_and_command_line_wins(tmp_path):
    """strategy/cpu_bf16.yaml overrides the precision group choice; an explicit precision=... wins."""
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    (conf / "precision").mkdir(parents=True)
    (conf / "strategy").mkdir()
    for name, value in [("32", "32-true"), ("bf16-mixed", "bf16-mixed"), ("bf16-true", "bf16-true")]:
        (conf / "precision" / f"{name}.yaml").write_text(f"# @package trainer\nprecision: {value}\n")
    (conf / "strategy" / "cpu_bf16.yaml").write_text((STRATEGY_DIR / "cpu_bf16.yaml").read_text())
    (conf / "strategy" / "auto.yaml").write_text((STRATEGY_DIR / "auto.yaml").read_text())
    (conf / "train.yaml").write_text("defaults:\n  - precision: '32'\n  - strategy: auto\n  - _self_\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        assert compose("train", overrides=["strategy=auto"]).trainer.precision == "32-true"
        assert compose("train", overrides=["strategy=cpu_bf16"]).trainer.precision == "bf16-mixed"
        cfg = compose("train", overrides=["strategy=cpu_bf16", "precision=bf16-true"])
        assert cfg.trainer.precision == "bf16-true" and cfg.strategy.name == "cpu_bf16"


def test_cpu_bf16_trains_with_bf16_autocast(tmp_path):
    """One CPU process, precision bf16-mixed: the matmuls run in bf16 (AMX), weights stay fp32."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = tiny_gpt2()
            self.dtypes = set()

        def training_step(self, batch, batch_idx):
            out = self.model(input_ids=batch, labels=batch)
            self.dtypes.add(out.logits.dtype)
            return out.loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.randint(2, 18, (4, SEQ), generator=torch.Generator().manual_seed(0))
    module = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=instantiate(strategy_node("cpu_bf16")), precision="bf16-mixed",
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert module.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_fp16_on_cpu_is_refused_for_every_strategy():
    """fp16 needs a GPU (llmlab.checks.trainer.check_precision, the one home of precision x device): DeepSpeed
    on a CPU included, with trainer.accelerator=cpu (config alone) or auto on a machine without CUDA."""
    from llmlab.checks import entry as checks
    from llmlab.checks.trainer import check_precision
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="precision=bf16-mixed"):
        checks.check_config(_run_cfg("strategy=zero2", "precision=16-mixed"))
    with pytest.raises(ConfigError, match="trainer.accelerator=auto"):
        check_precision(_run_cfg("strategy=zero2", "precision=16-mixed", "trainer.accelerator=auto"),
                        cuda_available=False)
    check_precision(_run_cfg("precision=16-mixed", "trainer.accelerator=auto"), cuda_available=True)
    check_precision(_run_cfg("strategy=zero3", "precision=bf16-mixed"))


def test_helpers_are_no_ops_without_zero3():
    import torch

    from llmlab.evaluation.generation import generation_context
    from llmlab.distributed.zero3 import gathered_state_dict, hf_deepspeed_context
    from llmlab.distributed.detect import is_zero3

    model = tiny_gpt2()
    assert not is_zero3(model) and not is_zero3(strategy_node("zero2")) and is_zero3(strategy_node("zero3"))
    with hf_deepspeed_context(strategy_node("zero2")) as hf_config:
        assert hf_config is None
    with generation_context(model, "auto") as extra:
        assert extra == {}
    state = gathered_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hf_deepspeed_context_activates_and_restores():
    from transformers.integrations import is_deepspeed_zero3_enabled

    from llmlab.distributed.zero3 import hf_deepspeed_context

    assert not is_deepspeed_zero3_enabled()
    with hf_deepspeed_context(strategy_node("zero3")) as hf_config:
        assert hf_config is not None and is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()


def _run_cfg(*overrides: str):
    """The composed run config (llmlab's conf/, real groups), resolvers not needed for these checks."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=tiny", *overrides])


def test_check_config_runs_the_strategy_rules():
    """llmlab.checks.entry.check_config refuses strategy combinations with a ConfigError (exit 2 in the CLI)."""
    from llmlab.checks import entry as checks
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy=fsdp needs CUDA"):
        checks.check_config(_run_cfg("strategy=fsdp", "trainer.devices=2"))
    with pytest.raises(ConfigError, match="precision=bf16-mixed"):
        checks.check_config(_run_cfg("strategy=cpu_bf16", "precision='32'"))
    with pytest.raises(ConfigError, match="trainer.devices=1"):
        checks.check_config(_run_cfg("strategy=cpu_bf16", "trainer.devices=2"))
    checks.check_config(_run_cfg("strategy=ddp", "trainer.devices=1"))  # one DDP process is fine
    checks.check_config(_run_cfg("strategy=zero3", "trainer.devices=2"))


def test_qlora_storage_follows_the_strategy_and_precision():
    """Under ZeRO-3 an unset quant_storage becomes the dtype DeepSpeed keeps parameters in; elsewhere it
    stays bitsandbytes' uint8; the config node is not changed in place."""
    from llmlab.models.peft import peft_for_strategy, quant_storage_for
    from llmlab.distributed.precision import parameter_dtype

    cfg = _run_cfg("peft=qlora")
    assert cfg.peft.quantization.quant_storage is None
    zero3, zero2, ddp = strategy_node("zero3"), strategy_node("zero2"), strategy_node("ddp")
    assert quant_storage_for(cfg.peft, zero3, "32-true") == "float32"
    assert quant_storage_for(cfg.peft, zero3, "bf16-true") == quant_storage_for(cfg.peft, zero3, "bf16-mixed") == "bfloat16"
    assert quant_storage_for(cfg.peft, zero2, "bf16-true") is None and quant_storage_for(cfg.peft, ddp) is None
    adapted = peft_for_strategy(cfg.peft, zero3, "bf16-true")
    assert adapted.quantization.quant_storage == "bfloat16" and cfg.peft.quantization.quant_storage is None
    assert peft_for_strategy(cfg.peft, ddp) is cfg.peft
    assert parameter_dtype("16-mixed") == "float16"
    lora = _run_cfg("peft=lora").peft
    assert peft_for_strategy(lora, zero3) is lora


def test_qlora_strategy_refusals_name_the_fix(monkeypatch):
    from llmlab.checks.strategy import check_run

    cfg = _run_cfg("peft=qlora", "strategy=zero3", "precision=bf16-true", "peft.quantization.quant_storage=uint8")
    with pytest.raises(StrategyConfigError, match="quant_storage=bfloat16"):
        check_run(cfg)
    cfg = _run_cfg("peft=qlora", "strategy=zero2", "precision=bf16-true", "peft.quantization.quant_storage=float32")
    with pytest.raises(StrategyConfigError, match="DeepSpeed casts floating parameters to bfloat16"):
        check_run(cfg)
    check_run(_run_cfg("peft=qlora", "strategy=zero3"))  # storage set automatically: accepted
    # on a GPU machine FSDP itself is allowed, QLoRA x FSDP is not (untested here)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _run_cfg("peft=qlora", "strategy=fsdp", "trainer.accelerator=gpu", "precision=bf16-true")
    with pytest.raises(StrategyConfigError, match="peft=qlora with strategy=fsdp.*strategy=zero3"):
        check_run(cfg)
    check_run(_run_cfg("peft=lora", "strategy=fsdp", "trainer.accelerator=gpu", "precision=bf16-true"))


def test_checkpoint_kinds(tmp_path):
    """resume=auto / ckpt_path take a DeepSpeed checkpoint directory; a kind the strategy cannot read is
    refused with the fix, before any weights load."""
    import time as _time

    from llmlab.checkpointing.checkpoints import checkpoint_mtime, is_checkpoint, is_deepspeed_checkpoint
    from llmlab.checks.strategy import check_checkpoint_for_strategy

    single = tmp_path / "last.ckpt"
    single.write_bytes(b"x")
    ds = tmp_path / "ds" / "last.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    (ds / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert is_checkpoint(single) and is_checkpoint(ds) and not is_checkpoint(tmp_path / "missing")
    assert is_deepspeed_checkpoint(ds) and not is_deepspeed_checkpoint(single)
    assert not is_deepspeed_checkpoint(tmp_path)  # any directory is not a checkpoint
    check_checkpoint_for_strategy(ds, strategy_node("zero3"))
    check_checkpoint_for_strategy(single, strategy_node("ddp"))
    with pytest.raises(StrategyConfigError, match="DeepSpeed checkpoint directory.*convert"):
        check_checkpoint_for_strategy(ds, strategy_node("ddp"))
    with pytest.raises(StrategyConfigError, match="load_full_weights"):
        check_checkpoint_for_strategy(single, strategy_node("zero2"))
    # a DeepSpeed directory's age is its newest file's (files are rewritten inside it)
    _time.sleep(0.05)
    (ds / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"y")
    assert checkpoint_mtime(ds) >= (ds / "checkpoint" / "mp_rank_00_model_states.pt").stat().st_mtime


def test_seed_per_rank_gives_ranks_their_own_stream():
    """Several processes: each rank draws from seed + rank once training starts (dropout masks, PPO
    sampling differ between ranks), reproducibly; one process keeps the stream it has."""
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch

    from llmlab.callbacks.seed import SeedPerRank

    def draws(world_size: int, rank: int) -> tuple:
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        SeedPerRank(seed=7).on_train_start(SimpleNamespace(world_size=world_size, global_rank=rank), None)
        return torch.rand(3).tolist(), np.random.rand(), random.random()

    rank0, rank1 = draws(2, 0), draws(2, 1)
    assert rank0 == draws(2, 0)  # reproducible
    assert all(a != b for a, b in zip(rank0, rank1))  # torch, numpy and random all differ by rank
    torch.manual_seed(7 + 1)
    assert rank1[0] == torch.rand(3).tolist()  # rank r draws from seed + r
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    untouched = torch.rand(3).tolist(), np.random.rand(), random.random()
    assert draws(1, 0) == untouched  # one process: nothing reseeded


def test_log_train_averages_micro_batches_of_a_step():
    """stages.common.log_train logs once per optimizer step, the mean over its micro-batches."""
    import torch

    from llmlab.stages.common import log_train

    logged = []

    class Loop:
        def __init__(self):
            self.accumulate = True

        def _should_accumulate(self):
            return self.accumulate

    class Trainer:
        fit_loop = Loop()

    class Module:
        automatic_optimization = True
        _trainer = Trainer()

        def log(self, name, value, **kw):
            logged.append((name, float(value), kw.get("sync_dist")))

    m = Module()
    log_train(m, "train/loss", torch.tensor(1.0))  # micro-batch 1 of 2: nothing yet
    assert logged == []
    m._trainer.fit_loop.accumulate = False
    log_train(m, "train/loss", torch.tensor(3.0))  # micro-batch 2: the step's mean, reduced over ranks
    assert logged == [("train/loss", 2.0, True)]
    log_train(m, "train/loss", torch.tensor(5.0))  # the next step starts afresh
    assert logged[-1] == ("train/loss", 5.0, True)
