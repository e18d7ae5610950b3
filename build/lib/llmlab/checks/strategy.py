"""The strategy group's rules, before any weights load: strategy x trainer x precision (`check_strategy`),
strategy x PEFT (`check_run`: QLoRA's 4-bit storage under DeepSpeed, QLoRA x FSDP, LLM.int8 x DeepSpeed/FSDP),
strategy.load_full_weights, and which checkpoint kinds a strategy can resume (`check_checkpoint_for_strategy`).
Each refusal is a `StrategyConfigError` (a ConfigError: one line, exit 2) naming the override to change.
QLoRA's storage dtype under ZeRO-3 is set automatically (llmlab.models.peft.peft_for_strategy). No torch import
at module level; DeepSpeed-ness comes from `detect.zero_stage`.

Elsewhere: precision x device (fp16 needs a GPU, every strategy) is trainer.py `check_precision`; PEFT x
precision (QLoRA's compute dtype, 4-bit storage under -true) is model.py `check_peft_settings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmlab.checkpointing.checkpoints import is_deepspeed_checkpoint, is_fsdp_checkpoint
from llmlab.distributed.detect import is_deepspeed, is_zero3, strategy_name, uses_cpu
from llmlab.distributed.precision import half_dtype, parameter_dtype
from llmlab.errors import StrategyConfigError

UNPACKED_STORAGE = (None, "uint8", "int8")  # bitsandbytes' own packing: integer bytes


def is_fsdp(strategy_cfg: Any) -> bool:
    """strategy=fsdp, or a strategy node whose `_target_` builds FSDP."""
    target = str(strategy_cfg.get("_target_", "")) if hasattr(strategy_cfg, "get") else ""
    return strategy_name(strategy_cfg) == "fsdp" or "fsdp" in target.lower()


def check_fsdp(accelerator: Any = "auto", cuda_available: bool | None = None) -> None:
    """FSDP shards over CUDA GPUs only: Lightning refuses it on CPU ("requires a GPU accelerator")."""
    if uses_cpu(accelerator, cuda_available):
        raise StrategyConfigError(
            f"strategy=fsdp needs CUDA GPUs, but this run is on CPU (trainer.accelerator={accelerator}). "
            "To shard parameters on CPU use strategy=zero3 (DeepSpeed ZeRO-3 runs on CPU processes; "
            "strategy=zero3_offload also offloads), or strategy=ddp; on a GPU machine set "
            "trainer.accelerator=gpu."
        )


def check_strategy(
    strategy_cfg: Any,
    *,
    accelerator: Any = "auto",
    precision: Any = "32-true",
    devices: Any = 1,
    num_nodes: int = 1,
    cuda_available: bool | None = None,
) -> None:
    """Refuse strategy x trainer/precision combinations that cannot work, naming the override to change.

    `strategy_cfg` is the `strategy` config node (or its name); the rest are the trainer's settings.
    Raises `StrategyConfigError`; returns None when the combination is fine.
    """
    name = strategy_name(strategy_cfg)
    precision = str(precision)
    on_cpu = uses_cpu(accelerator, cuda_available)

    if is_fsdp(strategy_cfg):
        check_fsdp(accelerator, cuda_available)

    if name == "cpu_bf16":
        if half_dtype(precision) != "bfloat16":
            raise StrategyConfigError(
                f"strategy=cpu_bf16 trains in bf16 on the CPU, but precision={precision}: "
                "add precision=bf16-mixed (autocast, fp32 weights) or precision=bf16-true."
            )
        if not on_cpu:
            raise StrategyConfigError(
                f"strategy=cpu_bf16 runs on the CPU, but trainer.accelerator={accelerator} selects a GPU: "
                "set trainer.accelerator=cpu, or pick strategy=auto / ddp / zero2 / zero3 for GPUs."
            )
        if str(devices) not in ("1", "auto") or int(num_nodes) != 1:
            raise StrategyConfigError(
                f"strategy=cpu_bf16 is one process (trainer.devices={devices}, trainer.num_nodes={num_nodes}): "
                "set trainer.devices=1 trainer.num_nodes=1, or use strategy=ddp / zero2 / zero3 with "
                "precision=bf16-mixed for several CPU processes."
            )


def check_run(cfg: Any) -> None:
    """The strategy rules of a composed run config (`llmlab.checks.entry.check_config` calls this before any
    weights load): strategy x trainer x precision (`check_strategy`) and strategy x PEFT.

    Refused, each with the fix in the message:
    - `strategy=fsdp` on CPU; `cpu_bf16` with a non-bf16 precision, a GPU, or several processes (`check_strategy`).
    - `strategy.load_full_weights=true` with a strategy other than ZeRO-3.
    - `peft=lora_int8` x DeepSpeed/FSDP (bitsandbytes int8 weights cannot be sharded by llmlab).
    - `peft=qlora` x ZeRO-3 with an integer `quant_storage` (uint8/int8 cannot be partitioned; an unset
      one is set automatically, see `quant_storage_for`); `peft=qlora` x DeepSpeed with a float
      `quant_storage` other than the precision's parameter dtype (DeepSpeed's cast would corrupt it).
    - `peft=qlora` x `strategy=fsdp`: not supported by llmlab (bitsandbytes x FSDP untested here).
    """
    strategy_cfg, trainer = cfg.strategy, cfg.trainer
    check_strategy(
        strategy_cfg,
        accelerator=trainer.get("accelerator", "auto"),
        precision=trainer.get("precision", "32-true"),
        devices=trainer.get("devices", 1),
        num_nodes=trainer.get("num_nodes", 1) or 1,
    )
    name = strategy_name(strategy_cfg)
    if strategy_cfg.get("load_full_weights") and not is_zero3(strategy_cfg):
        raise StrategyConfigError(
            f"strategy.load_full_weights=true only applies to ZeRO-3 (strategy=zero3), not strategy={name}: resume "
            f"a single-file checkpoint with the strategy it was written with (e.g. strategy=ddp), or use "
            f"strategy=zero3")
    peft_cfg = cfg.get("peft")
    method = peft_cfg.get("method") if peft_cfg is not None else None
    if method == "lora_int8" and (is_deepspeed(strategy_cfg) or is_fsdp(strategy_cfg)):
        raise StrategyConfigError(
            f"peft=lora_int8 with strategy={name}: bitsandbytes int8 weights x DeepSpeed/FSDP sharding is not "
            f"supported by llmlab; use strategy=ddp (or the default), or peft=qlora (4-bit, works with strategy=zero3)")
    if method != "qlora":
        return
    if is_fsdp(strategy_cfg):
        raise StrategyConfigError(
            "peft=qlora with strategy=fsdp is not supported by llmlab (bitsandbytes 4-bit weights x FSDP "
            "flat parameters are untested here); use strategy=zero3 (QLoRA x ZeRO-3 is supported), "
            "strategy=ddp, or peft=lora with strategy=fsdp."
        )
    storage = peft_cfg.quantization.get("quant_storage")
    precision = trainer.get("precision", "32-true")
    wanted = parameter_dtype(precision)
    if is_zero3(strategy_cfg) and storage in UNPACKED_STORAGE[1:]:
        raise StrategyConfigError(
            f"peft=qlora with strategy={name} (ZeRO-3): 4-bit weights packed in "
            f"peft.quantization.quant_storage={storage} cannot be partitioned; set "
            f"peft.quantization.quant_storage={wanted} (or null: under ZeRO-3 it becomes the dtype of "
            f"precision={precision} automatically)."
        )
    if is_deepspeed(strategy_cfg) and storage not in UNPACKED_STORAGE and storage != wanted:
        raise StrategyConfigError(
            f"peft=qlora with strategy={name} and precision={precision}: DeepSpeed casts floating parameters "
            f"to {wanted}, which would corrupt 4-bit weights packed in peft.quantization.quant_storage="
            f"{storage}; set peft.quantization.quant_storage={wanted} (or null)."
        )


def check_checkpoint_for_strategy(path: Any, strategy_cfg: Any) -> None:
    """Resuming needs the checkpoint kind the strategy reads: DeepSpeed restores its own sharded
    directories (the same ZeRO stage and number of processes: its optimizer shards are per rank),
    sharded FSDP its torch.distributed.checkpoint directories, the other strategies single files."""
    name = strategy_name(strategy_cfg)
    if is_deepspeed_checkpoint(path) and not is_deepspeed(strategy_cfg):
        raise StrategyConfigError(
            f"{path} is a DeepSpeed checkpoint directory, which strategy={name} cannot resume; resume with "
            "the strategy (zero1/zero2/zero3) and trainer.devices it was written with, or convert it to one "
            "file first: python -c \"from lightning.pytorch.utilities.deepspeed import "
            f"convert_zero_checkpoint_to_fp32_state_dict as c; c('{path}', 'full.ckpt')\" (weights only)."
        )
    if is_fsdp_checkpoint(path) and name != "fsdp":
        raise StrategyConfigError(
            f"{path} is a sharded FSDP checkpoint directory, which strategy={name} cannot resume; resume with "
            "strategy=fsdp, or convert it to one file first: python -m lightning.pytorch.utilities."
            f"consolidate_checkpoint {path} (then ckpt_path=<that file>)."
        )
    full_weights = bool(getattr(strategy_cfg, "get", lambda *_: False)("load_full_weights", False))
    if Path(path).is_file() and is_deepspeed(strategy_cfg) and not (full_weights and is_zero3(strategy_cfg)):
        raise StrategyConfigError(
            f"{path} is a single-file checkpoint; strategy={name} (DeepSpeed) resumes from the sharded "
            "checkpoint directories it writes. Resume with the strategy it was written with (e.g. "
            "strategy=ddp), or with strategy=zero3 set strategy.load_full_weights=true to load it (ZeRO-3 only)."
        )
