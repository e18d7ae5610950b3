"""Strategies: config nodes, checks, and real 2-process DDP / DeepSpeed ZeRO 1-3 runs on CPU.

The distributed tests run this file as a script, started in one of two ways that users have too:
`python tests/test_strategies.py --strategy ...` (Lightning's launcher re-runs the command for rank 1, as
for `python -m llmlab.run`), or `torchrun --nproc-per-node 2 ...` (Lightning reads the torchrun env vars;
both ranks import in parallel, so it is faster here). The same code serves both, unchanged.
Each rank writes what it saw to `<out>/rank<r>.json` (and rank 0 the adapter files); the tests compare.
Model: GPT-2 with 2 layers, 32 wide, vocabulary 256, no dropout, fp32, seed 0; data: fixed random
tokens, split by a DistributedSampler without shuffling, so every strategy sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.errors import StrategyConfigError

REPO = Path(__file__).resolve().parents[1]
STRATEGY_DIR = REPO / "conf" / "strategy"
VOCAB, SEQ = 256, 32
WORKER_TIMEOUT_S = 240  # a ZeRO-3 hang fails the test instead of blocking CI


# ------------------------------------------------------------------------------------------------
# Worker (runs in the launched processes)
# ------------------------------------------------------------------------------------------------


def _strategy_node(name: str, accelerator: str = "cpu"):
    from omegaconf import OmegaConf

    from tests.conftest import compose_group  # zero2|3|3_offload compose zero1.yaml: not a plain load

    root = OmegaConf.create({"trainer": {"accelerator": accelerator}, "strategy": compose_group("strategy", name)})
    return root.strategy


def _tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ * 2, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config)


def _worker(argv: list[str]) -> None:
    import argparse

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from llmlab.distributed import zero3
    from llmlab.evaluation import generation

    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="train", choices=["train", "lora", "hf"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rollout", action="store_true", help="generate inside training_step (PPO-like)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)

    world = args.devices
    n_samples = args.batch * world * args.steps
    tokens = torch.randint(2, 18, (n_samples, SEQ), generator=torch.Generator().manual_seed(1234))  # (N, T)

    class TinyLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []
            self.record: dict = {}
            if args.mode != "hf":  # small: build outside zero.Init (in __init__), as DDP does
                torch.manual_seed(0)
                self.model = _tiny_gpt2()
            if args.mode == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
                self.model = get_peft_model(self.model, lora)
                self.init_adapter = {
                    k: p.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad
                }

        def configure_model(self) -> None:
            if args.mode != "hf" or hasattr(self, "model"):
                return
            # Built under Lightning's zero.Init: once with HF's DeepSpeed integration, once without.
            torch.manual_seed(0)
            with zero3.hf_deepspeed_context(self.trainer.strategy) as hf_config:
                self.record["hf_config_active"] = hf_config is not None
                self.model = _tiny_gpt2()
            self.plain = _tiny_gpt2()
            self.plain.requires_grad_(False)

        def _generate_all_ways(self, prompt):
            """Greedy generation gathered, synced, and by a plain copy; ranks ask for different lengths,
            which hangs ZeRO-3 without `generation_context`."""
            rank = self.global_rank
            # eos_token_id=None: exactly max_new tokens, so the ranks' lengths differ for sure
            kwargs = dict(max_new_tokens=3 + 5 * rank, do_sample=False, pad_token_id=1, eos_token_id=None)
            with torch.no_grad():
                with generation.generation_context(self.model, self.trainer.strategy) as extra:
                    gathered = self.model.generate(prompt, **kwargs, **extra)
                with generation.generation_context(self.model, self.trainer.strategy, gather=False) as extra:
                    self.record["synced_kwargs"] = extra
                    synced = self.model.generate(prompt, **kwargs, **extra)
                reference = _tiny_gpt2()
                reference.load_state_dict(zero3.gathered_state_dict(self.model, rank0_only=False))
                reference.eval()
                expected = reference.generate(prompt, **kwargs)
            return {"gathered": gathered.tolist(), "synced": synced.tolist(), "reference": expected.tolist()}

        def training_step(self, batch, batch_idx):
            (input_ids,) = batch  # (B, T)
            if args.rollout and batch_idx == 1:
                self.record["rollout"] = self._generate_all_ways(input_ids[:1, :4])
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
            self.losses.append(loss.item())
            if args.mode == "hf" and batch_idx == 0:
                with torch.no_grad():
                    self.record["plain_first_loss"] = self.plain(input_ids=input_ids, labels=input_ids).loss.item()
            return loss

        def validation_step(self, batch, batch_idx):
            self.record["generate"] = self._generate_all_ways(batch[0][:1, :4])  # (1, 4) prompt

        def on_train_end(self) -> None:
            if args.mode != "lora":
                return
            from peft import get_peft_model_state_dict

            gathered = zero3.gathered_state_dict(self.model, trainable_only=True)
            naive = get_peft_model_state_dict(self.model)  # what a plain save would write
            self.record["naive_adapter_numel"] = sum(t.numel() for t in naive.values())
            self.record["adapter_numel"] = sum(t.numel() for t in self.init_adapter.values())
            zero3.save_pretrained_gathered(self.model, str(out / "adapter"))
            if self.global_rank == 0:
                torch.save({"gathered": gathered, "init": self.init_adapter}, out / "adapter_tensors.pt")

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

        def _loader(self, data):
            sampler = DistributedSampler(
                TensorDataset(data), num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
            )
            return DataLoader(TensorDataset(data), batch_size=args.batch, sampler=sampler)

        def train_dataloader(self):
            return self._loader(tokens)

        def val_dataloader(self):
            return self._loader(tokens[: world])

    strategy = instantiate(_strategy_node(args.strategy))
    if args.strategy.startswith("zero"):
        from llmlab.distributed.strategies import fill_auto_sizes

        fill_auto_sizes(strategy, hidden=32)  # what train.build_strategy does from an HF model's config
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        limit_val_batches=1 if args.mode == "hf" else 0, default_root_dir=str(out),
    )
    module = TinyLM()
    t0 = time.time()
    trainer.fit(module)
    record = {
        "losses": module.losses,
        "world_size": trainer.world_size,
        "strategy_class": type(trainer.strategy).__name__,
        "root_device": str(trainer.strategy.root_device),
        "process_group_backend": getattr(trainer.strategy, "_process_group_backend", None),
        "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        "fit_seconds": time.time() - t0,
        **module.record,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    from llmlab.train import close_process_group

    close_process_group()  # every rank exits 0 (no gloo threads left at interpreter shutdown)


# ------------------------------------------------------------------------------------------------
# Launching from pytest
# ------------------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """No inherited launcher/cluster variables, or Lightning would think Slurm/torchrun started us."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


_RUNS: dict[tuple, dict] = {}


def run_strategy(
    tmp_root: Path,
    strategy: str,
    mode: str = "train",
    devices: int = 2,
    batch: int = 4,
    launcher: str = "lightning",
    rollout: bool = False,
) -> dict:
    """Run the worker once per argument set per session (tests share runs); returns per-rank records."""
    key = (strategy, mode, devices, batch, launcher, rollout)
    if key in _RUNS:
        return _RUNS[key]
    out = tmp_root / "_".join(map(str, key))
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--strategy", strategy, "--out", str(out),
              "--mode", mode, "--devices", str(devices), "--batch", str(batch)] + (["--rollout"] if rollout else [])
    if launcher == "srun":
        cmd = ["srun", "--nodes=1", f"--ntasks-per-node={devices}", "--cpus-per-task=1", "--job-name=llmlab-test",
               f"--time=00:{WORKER_TIMEOUT_S // 60 + 1:02d}:00", sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", *script]
    else:
        cmd = [sys.executable, *script]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=_clean_env(), cwd=out, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{strategy}/{mode} did not finish in {WORKER_TIMEOUT_S}s (hang?)\n{err.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{strategy}/{mode} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    result = {"ranks": ranks, "out": out, "seconds": time.time() - t0}
    _RUNS[key] = result
    return result


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strategy_runs")


def _assert_close(actual: list[float], expected: list[float], rel: float = 1e-3) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert math.isclose(a, e, rel_tol=rel), f"step {step}: {a} vs {e} (all: {actual} vs {expected})"


# ------------------------------------------------------------------------------------------------
# Fast tests: config nodes, builders, checks
# ------------------------------------------------------------------------------------------------

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

    strategy = instantiate(_strategy_node(choice))
    expected = {"auto": str, "ddp": DDPStrategy, "cpu_bf16": SingleDeviceStrategy}.get(choice, CPUDeepSpeedStrategy)
    assert isinstance(strategy, expected)
    if isinstance(strategy, DeepSpeedStrategy):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(choice[4])
        assert ("offload_optimizer" in zero) == ("offload_param" in zero) == (choice == "zero3_offload")


def test_deepspeed_options_pass_through_and_overrides_merge():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = _strategy_node("zero2")
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
        strategy = instantiate(_strategy_node(choice))
        fill_auto_sizes(strategy, hidden_size(model))
        zero = strategy.config["zero_optimization"]
        assert zero["reduce_bucket_size"] == 64 * 64, choice
        if choice.startswith("zero3"):
            assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64) and zero["stage3_param_persistence_threshold"] == 640
            assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 10 * 64 * 64
        else:
            assert "stage3_prefetch_bucket_size" not in zero
    node = _strategy_node("zero3")
    node.reduce_bucket_size = 12345
    strategy = instantiate(node)
    fill_auto_sizes(strategy, 64)
    assert strategy.config["zero_optimization"]["reduce_bucket_size"] == 12345
    with pytest.raises(StrategyConfigError, match="reduce_bucket_size, stage3_prefetch_bucket_size.*=auto.*hidden size"):
        fill_auto_sizes(instantiate(_strategy_node("zero3")), hidden_size(torch.nn.Linear(2, 2)))


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
        check_strategy(_strategy_node("fsdp"), accelerator="cpu")
    with pytest.raises(Exception, match="strategy=fsdp needs CUDA"):  # the yaml's builder refuses too
        instantiate(_strategy_node("fsdp", accelerator="cpu"))
    check_fsdp("gpu", cuda_available=True)  # allowed where it can run


def test_cpu_bf16_checks():
    from llmlab.checks.strategy import check_strategy

    node = _strategy_node("cpu_bf16")
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
            self.model = _tiny_gpt2()
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
        accelerator="cpu", devices=1, strategy=instantiate(_strategy_node("cpu_bf16")), precision="bf16-mixed",
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert module.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_deepspeed_fp16_on_cpu_without_fp16_kernels_is_refused(monkeypatch):
    from llmlab.checks import strategy as checks_strategy
    from llmlab.checks.strategy import check_strategy

    monkeypatch.setattr(checks_strategy, "_cpu_fp16_supported", lambda: False)  # as on this project's machines

    with pytest.raises(StrategyConfigError, match="precision=bf16-mixed"):
        check_strategy(_strategy_node("zero2"), accelerator="cpu", precision="16-mixed")
    check_strategy(_strategy_node("zero3"), accelerator="cpu", precision="bf16-mixed")


def test_helpers_are_no_ops_without_zero3():
    import torch

    from llmlab.evaluation.generation import generation_context
    from llmlab.distributed.zero3 import gathered_state_dict, hf_deepspeed_context
    from llmlab.distributed.detect import is_zero3

    model = _tiny_gpt2()
    assert not is_zero3(model) and not is_zero3(_strategy_node("zero2")) and is_zero3(_strategy_node("zero3"))
    with hf_deepspeed_context(_strategy_node("zero2")) as hf_config:
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
    with hf_deepspeed_context(_strategy_node("zero3")) as hf_config:
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
    zero3, zero2, ddp = _strategy_node("zero3"), _strategy_node("zero2"), _strategy_node("ddp")
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
    check_checkpoint_for_strategy(ds, _strategy_node("zero3"))
    check_checkpoint_for_strategy(single, _strategy_node("ddp"))
    with pytest.raises(StrategyConfigError, match="DeepSpeed checkpoint directory.*convert"):
        check_checkpoint_for_strategy(ds, _strategy_node("ddp"))
    with pytest.raises(StrategyConfigError, match="load_full_weights"):
        check_checkpoint_for_strategy(single, _strategy_node("zero2"))
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


# ------------------------------------------------------------------------------------------------
# Distributed tier: 2 CPU processes
# ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_runs_two_processes_on_cpu(runs_dir):
    ranks = run_strategy(runs_dir, "ddp")["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["losses"]) for r in ranks] == [4, 4]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different shards of the data
    assert all(abs(r["losses"][0] - math.log(VOCAB)) < 0.3 for r in ranks)  # starts near uniform


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("zero", "launcher"),
    [("zero1", "torchrun"), ("zero2", "lightning"), ("zero3", "torchrun"), ("zero3_offload", "torchrun")],
)
def test_zero_losses_equal_ddp(runs_dir, zero, launcher):
    """Invariant: same seed, data and fp32 -> ZeRO's first 4 losses equal DDP's, rank by rank."""
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    result = run_strategy(runs_dir, zero, launcher=launcher, rollout=zero == "zero3")
    environment = {"lightning": "LightningEnvironment", "torchrun": "TorchElasticEnvironment"}[launcher]
    for rank in range(2):
        assert result["ranks"][rank]["cluster_environment"] == environment
        assert result["ranks"][rank]["root_device"] == f"cpu:{rank}"
        assert result["ranks"][rank]["strategy_class"] == "CPUDeepSpeedStrategy"
        assert result["ranks"][rank]["process_group_backend"] in ("gloo", "ccl")
        _assert_close(result["ranks"][rank]["losses"], ddp[rank]["losses"])


@pytest.mark.distributed
def test_zero3_generation_inside_training_step(runs_dir):
    """PPO-like rollout in training_step under ZeRO-3 (ranks asking for different lengths): no hang,
    same tokens as a plain copy, and training goes on unchanged (the losses above equal DDP's)."""
    ranks = run_strategy(runs_dir, "zero3", launcher="torchrun", rollout=True)["ranks"]
    for rank, record in enumerate(ranks):
        rollout = record["rollout"]
        assert len(rollout["reference"][0]) == 4 + 3 + 5 * rank
        assert rollout["gathered"] == rollout["reference"] and rollout["synced"] == rollout["reference"]
        assert record["synced_kwargs"] == {"synced_gpus": True}


@pytest.mark.distributed
def test_ddp_two_by_four_equals_auto_one_by_eight(runs_dir):
    """Invariant: 2 processes x batch 4 == 1 process x batch 8 (mean of the ranks' losses)."""
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    single = run_strategy(runs_dir, "auto", devices=1, batch=8)["ranks"][0]
    # one process, batch 8 = samples [0..7]; DistributedSampler gave rank 0 even and rank 1 odd samples
    # of the same 8, and each rank's loss is the mean over its 4 equal-length rows
    mean_of_ranks = [(a + b) / 2 for a, b in zip(ddp[0]["losses"], ddp[1]["losses"])]
    _assert_close(single["losses"], mean_of_ranks)


@pytest.mark.distributed
def test_lora_adapter_saved_under_zero3_holds_the_trained_weights(runs_dir):
    import torch
    from safetensors.torch import load_file

    result = run_strategy(runs_dir, "zero3", mode="lora", launcher="torchrun")
    rank0 = result["ranks"][0]
    # the bug this guards against: under ZeRO-3 the in-memory adapter tensors are empty shards
    assert rank0["naive_adapter_numel"] < rank0["adapter_numel"]
    tensors = torch.load(result["out"] / "adapter_tensors.pt")
    gathered, init = tensors["gathered"], tensors["init"]
    saved = load_file(result["out"] / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in gathered.values()) == rank0["adapter_numel"] > 0
    assert {k.replace(".default.", ".") for k in gathered} == set(saved)
    for key, value in gathered.items():
        on_disk = saved[key.replace(".default.", ".")]
        assert on_disk.shape == init[key].shape and on_disk.numel() > 0
        assert torch.equal(on_disk, value), key
        assert not torch.allclose(on_disk, init[key]), f"{key} did not train"
    assert rank0["losses"][-1] < rank0["losses"][0]


@pytest.mark.distributed
def test_zero3_hf_build_and_generation(runs_dir):
    """Model built by HF inside configure_model under ZeRO-3; validation generation with ranks asking
    for different lengths, both gathered and synced, equals a plain copy's greedy output."""
    ranks = run_strategy(runs_dir, "zero3", mode="hf", launcher="torchrun")["ranks"]
    for rank, record in enumerate(ranks):
        assert record["hf_config_active"]
        # with HF's DeepSpeed integration the weights start as HF initialises them (loss ~ ln 256)...
        assert abs(record["losses"][0] - math.log(VOCAB)) < 0.3, record["losses"]
        # ...without it, zero.Init leaves torch's default init (embedding N(0, 1)): far worse
        assert record["plain_first_loss"] > record["losses"][0] + 3, record
        gen = record["generate"]
        assert len(gen["reference"][0]) == 4 + 3 + 5 * rank
        assert gen["gathered"] == gen["reference"] and gen["synced"] == gen["reference"]
        assert record["synced_kwargs"] == {"synced_gpus": True}



def _slurm_up() -> bool:
    import shutil

    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slurm
@pytest.mark.distributed
def test_zero2_under_srun_uses_slurm_environment(runs_dir):
    """`srun --ntasks-per-node=2 python ...`: Lightning's SLURMEnvironment, no code change; same losses."""
    if not _slurm_up():
        pytest.skip("no Slurm cluster here (scripts/slurm_local.sh starts one)")
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    result = run_strategy(runs_dir, "zero2", launcher="srun")
    for rank in range(2):
        assert result["ranks"][rank]["cluster_environment"] == "SLURMEnvironment"
        _assert_close(result["ranks"][rank]["losses"], ddp[rank]["losses"])


if __name__ == "__main__":
    _worker(sys.argv[1:])
