"""What a run runs on, read from config or objects without importing torch or Lightning: the ZeRO stage
(`zero_stage`, the one answer to "is this DeepSpeed / ZeRO-3?" for a strategy object, config node, name,
DeepSpeed config dict, engine or module), the strategy's name in messages, and whether it trains on the CPU.
The config-only checks (`checks.entry.check_settings`, before torch loads) ask these too.
"""
from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from typing import Any

from llmlab.nodes import to_plain

# strategy config names (conf/strategy/<name>.yaml) that are DeepSpeed, with their ZeRO stage
DEEPSPEED_NAMES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
# `_target_`s that build a DeepSpeed strategy: llmlab's builder (and its pre-regroup path
# `llmlab.strategies.deepspeed`, which saved configs may name), or Lightning's class named directly
DEEPSPEED_TARGETS = ("llmlab.distributed.strategies.deepspeed", "llmlab.strategies.deepspeed", "DeepSpeedStrategy")


def loaded_class(module: str, name: str) -> type | None:
    """A class of a module only if that module is already imported: an object of that class cannot
    exist otherwise, so asking costs no import."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def zero_stage(obj: Any) -> int | None:
    """The ZeRO stage (0-3) `obj` runs DeepSpeed with, or None when it is not DeepSpeed.

    `obj`: a Lightning strategy (object or name), a `strategy` config node, a DeepSpeed config dict, a
    DeepSpeed engine, or a module (3 when DeepSpeed has partitioned its parameters, else None: a module
    alone does not tell ZeRO-1/2 from no DeepSpeed).
    """
    if obj is None:
        return None
    if isinstance(obj, str):
        return DEEPSPEED_NAMES.get(obj)
    ds_strategy = loaded_class("lightning.pytorch.strategies", "DeepSpeedStrategy")
    if ds_strategy is not None and isinstance(obj, ds_strategy):
        return int(obj.config.get("zero_optimization", {}).get("stage", 0))
    if type(obj).__name__ == "DeepSpeedEngine":
        return int(obj.zero_optimization_stage())
    module = loaded_class("torch.nn", "Module")
    if module is not None and isinstance(obj, module):
        return 3 if any(hasattr(p, "ds_id") for p in obj.parameters()) else None
    obj = to_plain(obj)
    if not isinstance(obj, Mapping):
        return None  # another strategy object (DDP, FSDP, single device)
    if "zero_optimization" in obj:  # a DeepSpeed config dict
        return int(obj["zero_optimization"].get("stage", 0))
    target = str(obj.get("_target_") or "")
    if not target:
        return DEEPSPEED_NAMES.get(str(obj.get("name")))
    if not target.endswith(DEEPSPEED_TARGETS):
        return None
    # the builder's `stage` (Lightning's default 2), unless config_overrides / config sets another
    for config in (obj.get("config_overrides"), obj.get("config")):
        if isinstance(config, Mapping) and "stage" in (config.get("zero_optimization") or {}):
            return int(config["zero_optimization"]["stage"])
    return int(obj.get("stage", 2))


def is_deepspeed(obj: Any) -> bool:
    """`zero_stage(obj) is not None`: `obj` (strategy, config node, name, engine) is DeepSpeed."""
    return zero_stage(obj) is not None


def is_zero3(obj: Any) -> bool:
    """`zero_stage(obj) == 3`: parameters are partitioned over the ranks."""
    return zero_stage(obj) == 3


def strategy_name(strategy_cfg: Any) -> str:
    """The name a strategy choice goes by in messages: its `name`, else its `_target_`'s last part."""
    if isinstance(strategy_cfg, str):
        return strategy_cfg
    if isinstance(strategy_cfg, Mapping) or hasattr(strategy_cfg, "get"):
        name = strategy_cfg.get("name")
        if name:
            return str(name)
        return str(strategy_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    raise TypeError(f"expected a strategy config node or name, got {type(strategy_cfg).__name__}")


def surely_no_cuda() -> bool:
    """True when this machine certainly has no usable CUDA GPU, known without importing torch: no NVIDIA device
    node (/dev/nvidia0, ...) and no GPU under /proc/driver/nvidia, or CUDA_VISIBLE_DEVICES hides them all. False
    means "maybe": torch decides later (`uses_cpu`)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


def uses_cpu(accelerator: Any, cuda_available: bool | None = None) -> bool:
    """Whether a run with this `trainer.accelerator` trains on the CPU (auto: when no CUDA GPU is visible)."""
    accelerator = str(accelerator or "auto").lower()
    if cuda_available is None:
        import torch  # lazy: the config checks import this module before torch loads

        cuda_available = torch.cuda.is_available()
    if accelerator == "auto":
        return not cuda_available
    return accelerator == "cpu"
