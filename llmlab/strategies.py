"""Lightning strategy objects for every `conf/strategy/*.yaml` choice, and the ZeRO-3 helpers LLM work needs.

Each yaml node is a set of constructor arguments: `_target_` names one of the builders below
(`auto`, `ddp`, `deepspeed`, `cpu_bf16`, `fsdp`), plus `name: <choice>` for logs and checks.
`trainer.devices`, `trainer.num_nodes` and `trainer.accelerator` stay trainer settings: no builder
takes them, so Lightning picks the cluster environment (Slurm `srun`, torchrun env vars, or its own
launcher re-running the script) with no code change here.

DeepSpeed on CPU (facts checked on the project's CPU-only machines, see docs/ENVIRONMENT.md):
Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA in `setup_environment` and requires
`parallel_devices` to carry indices 0..n-1 (`torch.device("cpu")` has none). `CPUDeepSpeedStrategy`
fixes exactly these two things when the accelerator is not CUDA and otherwise is the plain
`DeepSpeedStrategy`. DeepSpeed's own CPU accelerator uses oneCCL when `oneccl_bindings_for_pytorch`
is installed and gloo otherwise; we pick the process-group backend the same way.

ZeRO-3 helpers (all collective: call them on every rank):
- `hf_deepspeed_context`: makes Hugging Face build/load models partitioned and correctly initialised.
- `gathered_state_dict`, `save_pretrained_gathered`: full weights for PEFT adapters and `hf/` exports
  (a PEFT adapter saved naively under ZeRO-3 is empty: trl#4416, peft#2500).
- `generation_context`: `generate()` under ZeRO-3 without hangs when ranks stop at different lengths.
- `gathered_parameters`: full parameters on every rank for the duration (the PEFT export merges them).

Run-level pieces used by llmlab.checks / builder / train:
- `check_run`: every strategy rule of a composed config, before any weights load (StrategyConfigError
  is a ConfigError: one line, exit 2).
- `peft_for_strategy` / `quant_storage_for`: QLoRA's 4-bit storage dtype under ZeRO-3, automatically.
- `is_checkpoint`, `check_checkpoint_for_strategy`, `checkpoint_mtime`: re-exported from
  llmlab.checkpoints (finding, validating and choosing checkpoints lives there).
- `SeedPerRank`: different random streams per rank once training starts.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy

from llmlab.errors import ConfigError

# the checkpoint helpers live in llmlab.checkpoints; these names stay importable from here
from llmlab.checkpoints import (  # noqa: E402,F401
    check_checkpoint_for_strategy,
    checkpoint_mtime,
    is_checkpoint,
    is_deepspeed_checkpoint,
    is_fsdp_checkpoint,
)

__all__ = [
    "CPUDeepSpeedStrategy",
    "SeedPerRank",
    "StrategyConfigError",
    "auto",
    "check_checkpoint_for_strategy",
    "checkpoint_mtime",
    "check_fsdp",
    "check_run",
    "check_strategy",
    "cpu_bf16",
    "ddp",
    "deepspeed",
    "deepspeed_config",
    "fsdp",
    "gathered_parameters",
    "gathered_state_dict",
    "generation_context",
    "hf_deepspeed_context",
    "is_checkpoint",
    "is_deepspeed_checkpoint",
    "is_zero3",
    "peft_for_strategy",
    "quant_storage_for",
    "save_pretrained_gathered",
]

DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3", "zero3_offload")
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
FP16_PRECISIONS = ("16-mixed", "16-true", "16")


class StrategyConfigError(ConfigError):
    """A strategy choice that cannot work with the other settings; the message names the override to change.
    A `ConfigError` (a ValueError): `python -m llmlab.run` prints it as one line and exits 2."""


# --------------------------------------------------------------------------------------------------
# DeepSpeed on any accelerator
# --------------------------------------------------------------------------------------------------


def _cpu_process_group_backend() -> str:
    """oneCCL when its torch bindings are installed (the Xeon multi-process recipe), else gloo."""
    if importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)

        return "ccl"
    return "gloo"


def _use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator once per process from the hardware (CUDA when present). A run
    asked for on CPU (`trainer.accelerator=cpu`) on a GPU machine must use DeepSpeed's CPU accelerator."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` that also runs on CPU processes.

    With a CUDA accelerator every method is the parent's (the plain Lightning path). Otherwise:
    the CUDA-only check in `setup_environment` is skipped, CPU devices get the indices Lightning's
    device-index validation and `deepspeed.initialize(args.device_rank)` expect, and the process group
    uses gloo (or oneCCL when installed).

    `cpu_shm_comm=False` (default) stops DeepSpeed from JIT-compiling its shared-memory all-reduce op
    (`deepspeed_shm_comm`) at process-group start on CPU: it only serves inference tensor-parallel
    all-reduce, not ZeRO training, and costs ~90 s of C++ compilation per machine (and a compiler).
    """

    def __init__(self, *args: Any, cpu_shm_comm: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cuda:
            super().setup_environment()
            return
        _use_deepspeed_cpu_accelerator()
        assert self.parallel_devices is not None
        # Lightning gives CPU processes `torch.device("cpu")` (index None); DeepSpeedStrategy checks
        # indices == local ranks and hands `root_device.index` to deepspeed.initialize.
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        # DDPStrategy.setup_environment = Strategy.setup_environment (device setup) + setup_distributed,
        # i.e. the parent's body without its "only supported on CUDA GPUs" check.
        DDPStrategy.setup_environment(self)

    def _init_deepspeed_distributed(self) -> None:
        if not self._on_cuda and not self.cpu_shm_comm:
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the class docstring
        super()._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend:
            return self._process_group_backend
        if self.parallel_devices and self.root_device.type == "cpu":
            return _cpu_process_group_backend()
        return super()._get_process_group_backend()


def _to_plain(obj: Any) -> Any:
    """OmegaConf containers (what Hydra passes) to plain dicts/lists; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def _deep_merge(base: dict, overrides: Mapping) -> dict:
    """Merge `overrides` into `base` in place: nested dicts merge key by key, other values replace."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(_to_plain(value))
    return base


def deepspeed_config(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int = 200_000_000,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    pin_memory: bool = False,
    config_overrides: Mapping | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for a ZeRO stage (pure function: no DeepSpeed import).

    Lightning fills in what depends on the trainer when fitting starts: `gradient_accumulation_steps`
    (from `trainer.accumulate_grad_batches`; do not put it in `config_overrides`),
    `train_micro_batch_size_per_gpu`, `gradient_clipping`, and `bf16`/`fp16` from the precision.
    `config_overrides` is merged last, key by key (e.g. `{zero_optimization: {sub_group_size: 1e9}}`).
    """
    if stage not in (0, 1, 2, 3):
        raise StrategyConfigError(f"strategy.stage={stage!r}: ZeRO stages are 0, 1, 2 or 3.")
    if offload_parameters and stage != 3:
        raise StrategyConfigError(
            f"strategy.offload_parameters=true needs ZeRO stage 3 (got strategy.stage={stage}); "
            "use strategy=zero3_offload, or strategy.offload_parameters=false."
        )
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": contiguous_gradients,
        "overlap_comm": overlap_comm,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "allgather_bucket_size": int(allgather_bucket_size),
        "reduce_bucket_size": int(reduce_bucket_size),
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config: dict[str, Any] = {"zero_allow_untested_optimizer": True, "zero_optimization": zero}
    if offload_optimizer:
        # The stages build torch optimizers in configure_optimizers; DeepSpeed refuses those with an
        # offloaded optimizer unless told otherwise. On GPUs deepspeed.ops.adam.DeepSpeedCPUAdam steps
        # faster: set `config_overrides: {zero_force_ds_cpu_optimizer: true}` once the stage uses it.
        config["zero_force_ds_cpu_optimizer"] = False
    if config_overrides:
        _deep_merge(config, _to_plain(config_overrides))
    return config


# --------------------------------------------------------------------------------------------------
# Builders: the `_target_`s of conf/strategy/*.yaml
# --------------------------------------------------------------------------------------------------


def auto(name: str | None = "auto") -> str:
    """Lightning's choice: one process on one device (`ddp` when `trainer.devices` > 1)."""
    return "auto"


def ddp(
    name: str | None = "ddp",
    find_unused_parameters: bool = False,
    static_graph: bool = False,
    gradient_as_bucket_view: bool = True,
    process_group_backend: str | None = None,
    timeout_minutes: float = 30,
) -> DDPStrategy:
    """PyTorch DDP: full replica per process; gradients all-reduced (gloo on CPU, NCCL on CUDA)."""
    return DDPStrategy(
        find_unused_parameters=find_unused_parameters,
        static_graph=static_graph,
        gradient_as_bucket_view=gradient_as_bucket_view,
        process_group_backend=process_group_backend,
        timeout=timedelta(minutes=timeout_minutes),
    )


def deepspeed(
    stage: int = 2,
    name: str | None = None,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int = 200_000_000,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    pin_memory: bool = False,
    config_overrides: Mapping | None = None,
    process_group_backend: str | None = None,
    load_full_weights: bool = False,
    exclude_frozen_parameters: bool = False,
    timeout_minutes: float = 30,
    cpu_shm_comm: bool = False,
) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also parameters;
    offloading moves optimizer states / parameters to CPU memory (ZeRO-Offload / -Infinity).

    Returns a `CPUDeepSpeedStrategy`, which is the plain `DeepSpeedStrategy` whenever the trainer's
    accelerator is CUDA and the CPU-capable variant otherwise (chosen once the accelerator is known).
    `exclude_frozen_parameters=true` keeps frozen base weights out of DeepSpeed checkpoints (PEFT).
    `cpu_shm_comm=true` lets DeepSpeed build its CPU shared-memory all-reduce op (inference TP only).
    """
    config = deepspeed_config(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        allgather_bucket_size=allgather_bucket_size,
        reduce_bucket_size=reduce_bucket_size,
        overlap_comm=overlap_comm,
        contiguous_gradients=contiguous_gradients,
        pin_memory=pin_memory,
        config_overrides=config_overrides,
    )
    return CPUDeepSpeedStrategy(
        config=config,
        process_group_backend=process_group_backend,
        load_full_weights=load_full_weights,
        exclude_frozen_parameters=exclude_frozen_parameters,
        timeout=timedelta(minutes=timeout_minutes),
        cpu_shm_comm=cpu_shm_comm,
    )


def cpu_bf16(name: str | None = "cpu_bf16") -> SingleDeviceStrategy:
    """One process on the CPU; bf16 comes from the precision group (autocast on AMX for `bf16-mixed`).

    `check_strategy` requires `precision` bf16-mixed/bf16-true, `trainer.accelerator` cpu (or auto
    on a machine without CUDA) and one device on one node.
    """
    return SingleDeviceStrategy(device=torch.device("cpu"))


def fsdp(
    name: str | None = "fsdp",
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    state_dict_type: str = "sharded",
    activation_checkpointing_policy: Any = None,
    accelerator: str | None = None,
) -> Strategy:
    """PyTorch FSDP (CUDA only). `accelerator` (the yaml passes `trainer.accelerator`) lets this
    refuse CPU runs here, with the fix, instead of deep inside Lightning."""
    check_fsdp(accelerator or "auto")
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        activation_checkpointing_policy=activation_checkpointing_policy,
    )


# --------------------------------------------------------------------------------------------------
# Checks (before any weights load)
# --------------------------------------------------------------------------------------------------


def _uses_cpu(accelerator: Any, cuda_available: bool | None) -> bool:
    accelerator = str(accelerator or "auto").lower()
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if accelerator == "auto":
        return not cuda_available
    return accelerator == "cpu"


def _cpu_fp16_supported() -> bool:
    """What DeepSpeed's CPU accelerator asks (`is_fp16_supported`): oneDNN fp16 kernels on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def check_fsdp(accelerator: Any = "auto", cuda_available: bool | None = None) -> None:
    """FSDP shards over CUDA GPUs only: Lightning refuses it on CPU ("requires a GPU accelerator")."""
    if _uses_cpu(accelerator, cuda_available):
        raise StrategyConfigError(
            f"strategy=fsdp needs CUDA GPUs, but this run is on CPU (trainer.accelerator={accelerator}). "
            "To shard parameters on CPU use strategy=zero3 (DeepSpeed ZeRO-3 runs on CPU processes; "
            "strategy=zero3_offload also offloads), or strategy=ddp; on a GPU machine set "
            "trainer.accelerator=gpu."
        )


def _strategy_name(strategy_cfg: Any) -> str:
    if isinstance(strategy_cfg, str):
        return strategy_cfg
    if isinstance(strategy_cfg, Mapping) or hasattr(strategy_cfg, "get"):
        name = strategy_cfg.get("name")
        if name:
            return str(name)
        target = str(strategy_cfg.get("_target_", ""))
        return target.rsplit(".", 1)[-1]
    raise TypeError(f"expected a strategy config node or name, got {type(strategy_cfg).__name__}")


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
    name = _strategy_name(strategy_cfg)
    precision = str(precision)
    on_cpu = _uses_cpu(accelerator, cuda_available)

    if name == "fsdp":
        check_fsdp(accelerator, cuda_available)

    if name == "cpu_bf16":
        if precision not in BF16_PRECISIONS:
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

    is_deepspeed = name in DEEPSPEED_STRATEGIES or (
        not isinstance(strategy_cfg, str) and str(strategy_cfg.get("_target_", "")).endswith(".deepspeed")
    )
    if is_deepspeed and on_cpu and precision in FP16_PRECISIONS and not _cpu_fp16_supported():
        raise StrategyConfigError(
            f"strategy={name} with precision={precision} on CPU: this CPU has no fp16 support in oneDNN, "
            "which DeepSpeed's CPU accelerator requires for fp16; use precision=bf16-mixed (AMX) or precision=32."
        )


def _is_deepspeed(strategy_cfg: Any) -> bool:
    if isinstance(strategy_cfg, DeepSpeedStrategy):
        return True
    if strategy_cfg is None or isinstance(strategy_cfg, (str, Strategy)):
        return str(strategy_cfg) in DEEPSPEED_STRATEGIES
    return _strategy_name(strategy_cfg) in DEEPSPEED_STRATEGIES or str(strategy_cfg.get("_target_", "")).endswith(
        "strategies.deepspeed"
    )


UNPACKED_STORAGE = (None, "uint8", "int8")


def parameter_dtype(precision: Any) -> str:
    """The dtype DeepSpeed keeps floating parameters in for a Lightning precision: it casts the module
    to bf16/fp16 for bf16-*/16-* (mixed too: DeepSpeed's own bf16/fp16 mode) and to fp32 for 32-true."""
    precision = str(precision)
    if precision in BF16_PRECISIONS:
        return "bfloat16"
    if precision in FP16_PRECISIONS:
        return "float16"
    return "float32"


def quant_storage_for(peft_cfg: Any, strategy_cfg: Any, precision: Any = "32-true") -> str | None:
    """The storage dtype QLoRA's packed 4-bit weights get under this strategy (None: bitsandbytes' uint8).

    ZeRO-3 partitions parameters as flat float buffers: uint8-packed 4-bit weights cannot be sharded;
    the same bytes viewed as a float dtype can. That dtype must be the one DeepSpeed casts floating
    parameters to (`parameter_dtype(precision)`), or the cast would corrupt the packed bits. So under
    ZeRO-3 an unset `peft.quantization.quant_storage` becomes that dtype (checked on CPU: bfloat16 with
    bf16-true and bf16-mixed, float32 with 32-true); an explicit choice is kept (`check_run` refuses
    the ones that cannot work).
    """
    if peft_cfg is None or peft_cfg.get("method") != "qlora":
        return None
    storage = (peft_cfg.get("quantization") or {}).get("quant_storage")
    if storage is None and is_zero3(strategy_cfg):
        return parameter_dtype(precision)
    return storage


def peft_for_strategy(peft_cfg: Any, strategy_cfg: Any, precision: Any = "32-true") -> Any:
    """`peft_cfg`, with `quantization.quant_storage` as `quant_storage_for` decides (a copy when it changes).

    llmlab.builder builds every model through this, so `peft=qlora strategy=zero3` needs no extra flag."""
    storage = quant_storage_for(peft_cfg, strategy_cfg, precision)
    if peft_cfg is None or peft_cfg.get("method") != "qlora" or storage == peft_cfg.quantization.get("quant_storage"):
        return peft_cfg
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(peft_cfg, resolve=True))
    node.quantization.quant_storage = storage
    return node


def check_run(cfg: Any) -> None:
    """The strategy rules of a composed run config (`llmlab.checks.check_config` calls this before any
    weights load): strategy x trainer x precision (`check_strategy`) and strategy x PEFT.

    Refused, each with the fix in the message:
    - `strategy=fsdp` on CPU; `cpu_bf16` with a non-bf16 precision, a GPU, or several processes;
      DeepSpeed fp16 on a CPU without oneDNN fp16 kernels (`check_strategy`).
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
    peft_cfg = cfg.get("peft")
    if peft_cfg is None or peft_cfg.get("method") != "qlora":
        return
    name = _strategy_name(strategy_cfg)
    if name == "fsdp":
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
    if _is_deepspeed(strategy_cfg) and storage not in UNPACKED_STORAGE and storage != wanted:
        raise StrategyConfigError(
            f"peft=qlora with strategy={name} and precision={precision}: DeepSpeed casts floating parameters "
            f"to {wanted}, which would corrupt 4-bit weights packed in peft.quantization.quant_storage="
            f"{storage}; set peft.quantization.quant_storage={wanted} (or null)."
        )


class SeedPerRank(L.Callback):
    """Several processes: reseed each rank's torch / numpy / random generators with `seed + global rank`
    when training starts, so dropout masks and sampling (PPO rollouts) differ between ranks instead of
    repeating the same random stream on different data. The model was built before this, with the same
    seed on every rank (ZeRO-3 partitions each rank's own copy, so the copies must be identical); the
    data order comes from the sampler's own seeded generator. One process: nothing changes."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            import random

            import numpy as np

            rank_seed = self.seed + trainer.global_rank
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            torch.manual_seed(rank_seed)


# --------------------------------------------------------------------------------------------------
# ZeRO-3 helpers
# --------------------------------------------------------------------------------------------------


def is_zero3(obj: Any) -> bool:
    """True for a ZeRO-3 DeepSpeedStrategy, a ZeRO-3 config (node or dict), or a module whose
    parameters DeepSpeed has partitioned."""
    if isinstance(obj, DeepSpeedStrategy):
        return obj.zero_stage_3
    if isinstance(obj, torch.nn.Module):
        return any(hasattr(p, "ds_id") for p in obj.parameters())
    config = _deepspeed_dict(obj)
    return config is not None and config.get("zero_optimization", {}).get("stage") == 3


def _deepspeed_dict(obj: Any) -> dict | None:
    """The DeepSpeed config dict behind a strategy object, a strategy config node, or a raw config."""
    if isinstance(obj, DeepSpeedStrategy):
        return copy.deepcopy(obj.config)
    if obj is None or isinstance(obj, (str, Strategy)):
        return None
    obj = _to_plain(obj)
    if not isinstance(obj, Mapping):
        return None
    if "zero_optimization" in obj:
        return copy.deepcopy(dict(obj))
    if str(obj.get("_target_", "")).endswith("strategies.deepspeed"):
        params = inspect.signature(deepspeed_config).parameters
        return deepspeed_config(**{k: v for k, v in obj.items() if k in params})
    return None


@contextlib.contextmanager
def hf_deepspeed_context(strategy: Any) -> Iterator[Any]:
    """Let Hugging Face build or load a model *partitioned* under ZeRO-3, with correct weights.

    Needed when the model is too big for one process: build it inside `LightningModule.configure_model`
    (Lightning runs that hook under `deepspeed.zero.Init` for ZeRO-3) within this context::

        def configure_model(self):
            with hf_deepspeed_context(self.trainer.strategy):
                self.model = AutoModelForCausalLM.from_pretrained(path)   # or from_config(cfg)

    While the context is open `transformers.integrations.HfDeepSpeedConfig` is alive, so
    `from_pretrained` loads each weight into its shards and `from_config` initialises weights on
    gathered tensors. Without it, a model built under `zero.Init` keeps torch's default init
    (embeddings N(0, 1): loss ~40 where DDP gives ~5.5 on a 256-token vocabulary).

    Not needed for models that fit one process: build them in `__init__` (outside `zero.Init`) and
    `deepspeed.initialize` partitions the already-initialised weights; that matches DDP exactly.
    Quantized (bitsandbytes) models must also be loaded outside `zero.Init`.

    `strategy` is a DeepSpeedStrategy, a strategy config node, or a DeepSpeed config dict; for
    anything that is not ZeRO-3 this is a no-op that yields None. Yields the HfDeepSpeedConfig.
    """
    if not is_zero3(strategy):
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    config = _deepspeed_dict(strategy)
    # zero.Init parses the whole config, which must name a batch size (Lightning adds the real one).
    if "train_batch_size" not in config:
        config.setdefault("train_micro_batch_size_per_gpu", 1)
    previous = hf_ds._hf_deepspeed_config_weak_ref
    hf_config = HfDeepSpeedConfig(config)  # registers a weakref: this local keeps it alive
    try:
        yield hf_config
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
        del hf_config


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def gathered_parameters(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Inside: every parameter of `module` holds its full tensor on every rank (ZeRO-3 gathers them;
    changes made inside are discarded). A no-op for parameters DeepSpeed has not partitioned.
    Collective under ZeRO-3. Needs the whole module in one process's memory."""
    return _gathered(list(module.parameters()))


def gathered_state_dict(
    module: torch.nn.Module,
    *,
    trainable_only: bool = False,
    rank0_only: bool = True,
) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with full (gathered) tensors, copied to CPU.

    Under ZeRO-3 each parameter lives in shards; this gathers one submodule at a time (so peak memory
    is one layer, not the model) and copies it out. It is collective: every rank must call it. With
    `rank0_only` the other ranks get `{}`. Keys are those of `module.state_dict()` (pass the HF model
    or PeftModel, not the DeepSpeed engine, to avoid a `module.` prefix). Custom `_save_to_state_dict`
    (e.g. bitsandbytes 4-bit quant states) is honoured. `trainable_only` keeps parameters with
    `requires_grad` (a PEFT adapter) and gathers only those.
    """
    keep = not rank0_only or _rank() == 0
    out: dict[str, torch.Tensor] = {}
    # one copy per parameter: tied weights (GPT-2's lm_head = wte) stay one tensor under both names,
    # so save_pretrained recognises them as tied and writes them once
    copies: dict[int, torch.Tensor] = {}
    gathered: set[int] = set()  # on every rank (not only where copies are kept): the same collectives everywhere

    def copy_of(p: torch.nn.Parameter, value: Any) -> torch.Tensor:
        if id(p) not in copies:
            copies[id(p)] = value.detach().to("cpu", copy=True)
        return copies[id(p)]

    def visit(mod: torch.nn.Module, prefix: str) -> None:
        if trainable_only:
            params = {n: p for n, p in mod._parameters.items() if p is not None and p.requires_grad}
            todo = [p for p in params.values() if id(p) not in gathered]
            gathered.update(id(p) for p in todo)
            with _gathered(todo):
                if keep:
                    for n, p in params.items():
                        out[prefix + n] = copy_of(p, p)
        else:
            params = {prefix + n: p for n, p in mod._parameters.items() if p is not None}
            todo = [p for p in params.values() if id(p) not in gathered]
            gathered.update(id(p) for p in todo)
            with _gathered(todo):
                if keep:
                    local: dict[str, Any] = {}
                    mod._save_to_state_dict(local, prefix, keep_vars=False)
                    for k, v in local.items():
                        if k in params:
                            out[k] = copy_of(params[k], v)
                        else:
                            out[k] = v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
        for child_name, child in mod._modules.items():
            if child is not None:
                visit(child, prefix + child_name + ".")

    visit(module, "")
    return out


def save_pretrained_gathered(model: torch.nn.Module, save_directory: str, **kwargs: Any) -> None:
    """`model.save_pretrained(save_directory)` with real weights under ZeRO-3; collective, rank 0 writes.

    A PeftModel saves its adapter: its trainable parameters are gathered for the duration of PEFT's own
    save (so every adapter type sees full tensors). Any other HF model saves a full gathered
    state dict (an `hf/` export loadable with `from_pretrained`).
    """
    # duck-typed PeftModel check: importing peft imports bitsandbytes, which warns on CPU machines
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        trainable = [p for p in model.parameters() if p.requires_grad]
        with _gathered(trainable):
            if _rank() == 0:
                model.save_pretrained(save_directory, **kwargs)
    else:
        state_dict = gathered_state_dict(model)
        if _rank() == 0:
            model.save_pretrained(save_directory, state_dict=state_dict, **kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _zero3_engine(strategy: Any) -> Any:
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.model if strategy.zero_stage_3 else None
    if type(strategy).__name__ == "DeepSpeedEngine":
        return strategy if strategy.zero_optimization_stage() == 3 else None
    return None


def _zero3_hook_owner(engine: Any) -> Any:
    """The DeepSpeed object holding the per-submodule fetch/release hooks of a ZeRO-3 engine."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


@contextlib.contextmanager
def generation_context(model: torch.nn.Module, strategy: Any = None, *, gather: bool = True) -> Iterator[dict]:
    """Use around `model.generate(...)` so ZeRO-3 ranks neither hang nor crawl; yields extra generate kwargs.

        with generation_context(self.model, self.trainer.strategy) as gen_kwargs:
            out = self.model.generate(input_ids, max_new_tokens=32, **gen_kwargs)

    Under ZeRO-3 every forward all-gathers each layer, so a rank that stops generating early (EOS)
    leaves the others waiting forever. Two cures:
    - `gather=True` (default): gather the full parameters once and remove DeepSpeed's per-layer hooks
      for the call; ranks then generate independently and fast. Needs the whole model in one
      process's memory.
    - `gather=False`: yields `{"synced_gpus": True}`: HF keeps every rank stepping until all are done.
      Memory-light, slower.
    Not ZeRO-3 (or `strategy` None and parameters not partitioned): a no-op yielding `{}`.
    Collective under ZeRO-3: all ranks must enter it.
    """
    engine = _zero3_engine(strategy)
    if engine is None and not is_zero3(model):
        yield {}
        return
    if not gather:
        multi = torch.distributed.is_available() and torch.distributed.is_initialized()
        yield {"synced_gpus": multi and torch.distributed.get_world_size() > 1}
        return
    hooks = _zero3_hook_owner(engine) if engine is not None else None
    if hooks is not None:
        # DeepSpeed may have prefetches in flight (e.g. after validation, for the next forward); a gather
        # skips in-flight parameters and, with the hooks removed below, nothing would wait for them
        # (seen: "'weight' must be 2-D" in generate). Wait for them and release everything first.
        hooks.empty_partition_cache()
    with _gathered(list(model.parameters())):
        if hooks is not None:
            for handle in [*hooks.forward_hooks, *hooks.backward_hooks]:
                handle.remove()
            hooks.forward_hooks, hooks.backward_hooks = [], []
        try:
            yield {}
        finally:
            if hooks is not None:
                hooks._register_deepspeed_module(hooks.module)
