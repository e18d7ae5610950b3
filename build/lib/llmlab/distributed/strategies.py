"""Lightning strategy objects for every `conf/strategy/*.yaml` choice.

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

Elsewhere: the rules that refuse impossible strategy combinations (`llmlab.checks.strategy`), "is this
DeepSpeed / ZeRO-3" and the ZeRO-3 gather helpers (`llmlab.distributed.zero3`), generation under ZeRO-3
(`llmlab.evaluation.generation`), per-rank seeds (`llmlab.callbacks.seed`).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
    Strategy,
)

from llmlab.checks.strategy import check_fsdp
from llmlab.distributed.detect import is_deepspeed, loaded_class
from llmlab.errors import StrategyConfigError
from llmlab.nodes import to_plain

__all__ = ["CPUDeepSpeedStrategy", "auto", "cpu_bf16", "ddp", "deepspeed", "fsdp"]


# --------------------------------------------------------------------------------------------------
# DeepSpeed on any accelerator
# --------------------------------------------------------------------------------------------------


def _cpu_process_group_backend() -> str:
    """oneCCL when its torch bindings are installed (the Xeon multi-process recipe), else gloo."""
    if importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
        # lazy: optional, imported only where installed
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)

        return "ccl"
    return "gloo"


def _use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator once per process from the hardware (CUDA when present). A run
    asked for on CPU (`trainer.accelerator=cpu`) on a GPU machine must use DeepSpeed's CPU accelerator."""
    # lazy (DeepSpeed here and below): heavy and optional, for DeepSpeed strategies only
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


def _deep_merge(base: dict, overrides: Mapping) -> dict:
    """Merge `overrides` into `base` in place: nested dicts merge key by key, other values replace."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(to_plain(value))
    return base


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


# DeepSpeed sizes that follow the model, as the Hugging Face Trainer's `"auto"` (hidden = the model's
# hidden size): buffers that suit the model instead of GPU-throughput constants (200M-element reduce
# buckets double-buffered are 1.6 GB in fp32, more than sharding saves on a model that fits one process).
AUTO_SIZES = {  # zero_optimization key -> its size from the hidden size
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
    # llmlab's, not HF's: under a layer's worth of parameters live / kept for re-use, so ZeRO-3 releases
    # each layer's gathered weights after use instead of holding the whole forward until backward
    # (DeepSpeed's 1e9 defaults keep every parameter of a model under 1e9 gathered: bench/RESULTS.md)
    "stage3_max_live_parameters": lambda hidden: 10 * hidden * hidden,
    "stage3_max_reuse_distance": lambda hidden: 10 * hidden * hidden,
}


def fill_auto_sizes(strategy, hidden: int | None) -> None:
    """Replace each `"auto"` of AUTO_SIZES in a DeepSpeed strategy's config by its size for `hidden`."""
    zero = strategy.config.get("zero_optimization", {})
    auto = [k for k in AUTO_SIZES if zero.get(k) == "auto"]
    if not auto:
        return
    if hidden is None:
        raise StrategyConfigError(f"strategy: {', '.join(auto)}=auto sizes DeepSpeed's buffers from the model's hidden "
                                  f"size, which this model's config does not give; set numbers (e.g. "
                                  f"strategy.reduce_bucket_size=50000000)")
    for key in auto:
        zero[key] = AUTO_SIZES[key](hidden)


def deepspeed(
    stage: int = 2,
    name: str | None = None,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int | str = "auto",
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    pin_memory: bool = False,
    sub_group_size: int = 1_000_000_000,
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
    The ZeRO settings are Lightning's own constructor arguments (it builds the config from them);
    `sub_group_size` defaults to DeepSpeed's 1e9 (Lightning's default is 1e12). `reduce_bucket_size`
    (and under `config_overrides.zero_optimization` any other key of AUTO_SIZES) may be `"auto"`: sized
    from the model's hidden size once it is built (`fill_auto_sizes`).
    Lightning fills in what depends on the trainer when fitting starts: `gradient_accumulation_steps`
    (from `trainer.accumulate_grad_batches`; do not put it in `config_overrides`),
    `train_micro_batch_size_per_gpu`, `gradient_clipping`, and `bf16`/`fp16` from the precision.
    `config_overrides` is merged last into the config, key by key (e.g.
    `{zero_optimization: {sub_group_size: 1e9}}`).
    `exclude_frozen_parameters=true` keeps frozen base weights out of DeepSpeed checkpoints (PEFT).
    `cpu_shm_comm=true` lets DeepSpeed build its CPU shared-memory all-reduce op (inference TP only).
    """
    if stage not in (0, 1, 2, 3):
        raise StrategyConfigError(f"strategy.stage={stage!r}: ZeRO stages are 0, 1, 2 or 3.")
    if offload_parameters and stage != 3:
        raise StrategyConfigError(
            f"strategy.offload_parameters=true needs ZeRO stage 3 (got strategy.stage={stage}); "
            "use strategy=zero3_offload, or strategy.offload_parameters=false."
        )
    strategy = CPUDeepSpeedStrategy(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        allgather_bucket_size=int(allgather_bucket_size),
        reduce_bucket_size=reduce_bucket_size if reduce_bucket_size == "auto" else int(reduce_bucket_size),
        overlap_comm=overlap_comm,
        contiguous_gradients=contiguous_gradients,
        pin_memory=pin_memory,
        sub_group_size=int(sub_group_size),
        zero_allow_untested_optimizer=True,  # the stages build plain torch optimizers
        process_group_backend=process_group_backend,
        load_full_weights=load_full_weights,
        exclude_frozen_parameters=exclude_frozen_parameters,
        timeout=timedelta(minutes=timeout_minutes),
        cpu_shm_comm=cpu_shm_comm,
    )
    if offload_optimizer:
        # DeepSpeed refuses a torch optimizer with an offloaded optimizer unless told otherwise. On GPUs
        # deepspeed.ops.adam.DeepSpeedCPUAdam steps faster: set `config_overrides:
        # {zero_force_ds_cpu_optimizer: true}` once the stage uses it.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    if config_overrides:
        _deep_merge(strategy.config, to_plain(config_overrides))
    return strategy


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
    return FSDPStrategy(
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        activation_checkpointing_policy=activation_checkpointing_policy,
    )


def deepspeed_dict(obj: Any) -> dict | None:
    """The DeepSpeed config dict behind a strategy object, a strategy config node, or a raw config."""
    ds_strategy = loaded_class("lightning.pytorch.strategies", "DeepSpeedStrategy")
    if ds_strategy is not None and isinstance(obj, ds_strategy):
        return copy.deepcopy(obj.config)
    obj = to_plain(obj)
    if not isinstance(obj, Mapping) or not is_deepspeed(obj):
        return None
    if "zero_optimization" in obj:
        return copy.deepcopy(dict(obj))
    # the config node's own builder (below): the config it would run with
    params = inspect.signature(deepspeed).parameters
    return deepspeed(**{k: v for k, v in obj.items() if k in params}).config
