"""The collective ZeRO-3 helpers LLM work needs: everything here is collective under ZeRO-3 (call it on
every rank). Which stage a run uses is `distributed.detect.zero_stage`.
- `hf_deepspeed_context`: makes Hugging Face build/load models partitioned and correctly initialised.
- `gathered_state_dict`, `save_pretrained_gathered`: full weights for PEFT adapters and `hf/` exports
  (a PEFT adapter saved naively under ZeRO-3 is empty: trl#4416, peft#2500).
- `gathered_parameters`: full parameters on every rank for the duration (the PEFT export merges them).
- `gathered_without_hooks`: full parameters and DeepSpeed's per-layer hooks off (what generation needs,
  `evaluation.generation.generation_context`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations import deepspeed as hf_ds

from llmlab.distributed.detect import is_zero3, loaded_class, zero_stage
from llmlab.distributed.strategies import deepspeed_dict


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
    config = deepspeed_dict(strategy)
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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def world_size() -> int:
    """Processes in the default process group (1 when there is none)."""
    return torch.distributed.get_world_size() if _distributed() else 1


def _gathered(params: list) -> contextlib.AbstractContextManager:
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # lazy: heavy and optional, for DeepSpeed-partitioned parameters only

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def settle_partitions(strategy) -> None:
    """Wait for and re-partition every parameter ZeRO-3 left prefetched or gathered after the last forward
    (DeepSpeed's `empty_partition_cache`). Gathering one still in flight fails with "Cannot partition a
    param in flight": seen at train end (rm + QLoRA, 2 ranks) under small live-parameter limits."""
    engine = getattr(strategy, "deepspeed_engine", None)
    if engine is not None and hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


def gathered_parameters(module) -> contextlib.AbstractContextManager:
    """Inside: every parameter of `module` holds its full tensor on every rank (ZeRO-3 gathers them;
    changes made inside are discarded). A no-op for parameters DeepSpeed has not partitioned.
    Collective under ZeRO-3. Needs the whole module in one process's memory."""
    return _gathered(list(module.parameters()))


def gathered_state_dict(module, *, trainable_only: bool = False, rank0_only: bool = True) -> dict:
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


def save_pretrained_gathered(model, save_directory: str, **kwargs: Any) -> None:
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
    if _distributed():
        torch.distributed.barrier()


def _zero3_engine(strategy: Any) -> Any:
    """The DeepSpeed engine of a ZeRO-3 strategy (or the engine itself), else None."""
    if type(strategy).__name__ == "DeepSpeedEngine":
        return strategy if zero_stage(strategy) == 3 else None
    ds_strategy = loaded_class("lightning.pytorch.strategies", "DeepSpeedStrategy")
    if ds_strategy is not None and isinstance(strategy, ds_strategy) and zero_stage(strategy) == 3:
        return strategy.model
    return None


def _zero3_hook_owner(engine: Any) -> Any:
    """The DeepSpeed object holding the per-submodule fetch/release hooks of a ZeRO-3 engine."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


@contextlib.contextmanager
def gathered_without_hooks(model, strategy: Any = None) -> Iterator[None]:
    """Inside: `model`'s full parameters on every rank and the engine's per-layer fetch/release hooks
    removed (they would re-gather each layer on every forward), so each rank runs the model alone, at
    full speed. Needs the whole model in one process's memory. Collective under ZeRO-3; a no-op when
    nothing is partitioned."""
    engine = _zero3_engine(strategy)
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
            yield
        finally:
            if hooks is not None:
                hooks._register_deepspeed_module(hooks.module)
