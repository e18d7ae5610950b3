"""The recipe behind `python -m llmlab.run`: check -> data -> model -> stage -> trainer -> fit -> summary."""
from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from llmlab.callbacks.nonfinite import NonFiniteGuard
from llmlab.callbacks.preemption import SlurmRequeue
from llmlab.callbacks.progress import StepProgressBar
from llmlab.callbacks.seed import SeedPerRank
from llmlab.callbacks.stop import StopAtStep
from llmlab.callbacks.summary import RunSummary
from llmlab.checkpointing.atomic import atomic_write_text
from llmlab.checkpointing.resume import check_resume, resolve_ckpt_path
from llmlab.checkpointing.run_dir import commit as commit_run_dir
from llmlab.checks import entry as checks
from llmlab.checks.data import fill_block_size
from llmlab.console import print_summary, quiet_libraries
from llmlab.data.datamodule import LLMDataModule
from llmlab.distributed.detect import is_deepspeed
from llmlab.distributed.devices import describe, resolve_devices
from llmlab.distributed.memory import (
    dry_run_report,
    hidden_size,
    release_freed_memory,
    weights_bytes,
)
from llmlab.distributed.strategies import fill_auto_sizes
from llmlab.models.build import (
    build_tokenizer,
    compile_forward,
    count_params,
    param_bytes,
)
from llmlab.redact import redact_text, redacted_yaml
from llmlab.stages.build import build_stage, stage_class

log = logging.getLogger("llmlab")


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def precision_choice() -> str | None:
    """The precision group's choice (`default` when the user named none), or None outside a Hydra run."""
    return HydraConfig.get().runtime.choices.get("precision") if HydraConfig.initialized() else None


def record_failure(cfg: DictConfig, err: BaseException) -> None:
    """A failed job leaves summary.json with status=failed and its error (read by llmlab.report)."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # an error may quote a setting's value (a URL with user:pass@)
    summary = {"stage": cfg.stage.name, "status": "failed", "error": redact_text(f"{type(err).__name__}: {err}"),
               "run_dir": str(run_dir)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    (run_dir / "error.txt").write_text(redact_text("".join(traceback.format_exception(err))))


def close_process_group() -> None:
    """Destroy the default process group after a successful fit, on every rank.

    Without it gloo's worker threads may still hold work when the interpreter shuts down, and a rank
    that trained to the end aborts ("terminate called without an active exception", SIGABRT; seen
    with zero3 under torchrun on an AMD machine). Only after success: destroying while another rank is
    still inside a collective can deadlock (torchtitan#1342). The barrier makes every rank leave fit first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _instantiate_dict(node) -> list:
    return [instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]


def build_strategy(strategy_cfg: DictConfig, module):
    """The strategy of `conf/strategy`, given what the stage declares (`stages.interface.Stage`).

    A manual-optimization stage (ppo, grpo) clips its own gradients to `module.max_grad_norm`; under
    DeepSpeed that call is a no-op (the engine clips inside its `step()`, from its config's
    `gradient_clipping`, which Lightning fills from `trainer.gradient_clip_val`, refused with manual
    optimization). So the stage's norm goes into the DeepSpeed config here, unless the config sets one.
    """
    strategy = instantiate(strategy_cfg)
    if is_deepspeed(strategy):
        fill_auto_sizes(strategy, hidden_size(getattr(module, "model", None)))  # "auto" buffer sizes
        clip = None if module.automatic_optimization else module.max_grad_norm
        if clip:
            strategy.config.setdefault("gradient_clipping", float(clip))
    return strategy


def _param_bytes(cfg: DictConfig, model) -> int:
    """Bytes of the parameters as loaded; a dry run on the meta device (nothing loaded) states what a
    real run would load: 4-bit linear weights under QLoRA (llmlab/distributed/memory.py)."""
    on_meta = any(p.is_meta for p in model.parameters())
    return int(weights_bytes(model, four_bit=cfg.peft.method == "qlora")) if on_meta else param_bytes(model)


def train(cfg: DictConfig) -> float | None:
    # first: the libraries' noise filtered before anything is built (peft, torchao and DeepSpeed, which speak
    # as they import, load later, lazily); Lightning's own console handler off
    quiet_libraries()
    fill_block_size(cfg)  # data.block_size=null: the model's positions (before the checks and the saved config)
    # trainer.accelerator=auto -> gpu/cpu, precision=default -> bf16-mixed on a GPU / 32-true on the CPU: the checks
    # below judge what will run (e.g. fp16 on a machine without a GPU)
    devices = resolve_devices(cfg, precision_choice(), cfg.strategy.get("name"))
    checks.check_config(cfg)  # every cross-group rule, before any weights load
    if rank_zero_only.rank == 0:  # the console's first lines: where and in what precision this run trains
        log.info(describe(devices))
        if devices.get("warning"):  # bf16 emulated on this CPU: correct but ~100x slower, said before training
            log.warning(devices["warning"])
    if cfg.get("release_freed_memory"):  # before the model's allocations; in every process (DDP re-runs this)
        release_freed_memory()
        log.info("release_freed_memory: blocks >= 128 KiB are returned to the OS when freed (glibc mallopt)")
    # resume: the checkpoint must be intact and made under the same model/data/batch/world size; the
    # run dir's config_resolved.yaml (what the checkpoints were made under) is kept until that holds
    ckpt_path = None if cfg.dry_run else resolve_ckpt_path(cfg)  # torn/corrupt: skipped or refused
    if ckpt_path is not None:
        check_resume(cfg, ckpt_path)
    # the checks passed: only now .hydra/{config,hydra,overrides}.yaml and run.log go into the run dir
    commit_run_dir()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # credentials typed as overrides (+wandb_api_key=..., URLs with user:pass@) never reach the disk
    atomic_write_text(run_dir / "config_resolved.yaml", redacted_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    # a dry run of an init=scratch architecture needs shapes only: no tokenizer download when
    # model.config gives the vocabulary (`model=opt1.3b model.init=scratch dry_run=true` works offline)
    shapes_only = cfg.dry_run and cfg.model.init == "scratch" and "vocab_size" in (cfg.model.get("config") or {})
    tokenizer = None if shapes_only else build_tokenizer(cfg.model)
    stage_cls = stage_class(cfg.stage)
    datamodule = None
    if not cfg.dry_run:  # data errors (missing file/field, empty split) surface before weights load
        datamodule = LLMDataModule(cfg.data, stage_cls.data_format, tokenizer, seed=cfg.seed)
        datamodule.setup("fit")
    module = build_stage(cfg, tokenizer)
    total, trainable = count_params(module.model)
    info = {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
        "peft": cfg.peft.method,
        "precision": cfg.trainer.precision,
        "strategy": cfg.strategy.name,
        "total_params": total,  # weights the model has (4-bit ones counted as weights, not packed bytes)
        "trainable_params": trainable,
        "param_bytes": _param_bytes(cfg, module.model),  # what they occupy as loaded
    }
    log.info("model %s: %s params, %s trainable", cfg.model.name, f"{total:,}", f"{trainable:,}")
    if cfg.dry_run:
        return dry_run_report(cfg, module, info, run_dir)
    if cfg.get("compile"):  # the policy's forward through inductor, in place: checkpoints and hf/ unchanged
        compiled = compile_forward(module.model)
        log.info("compile: %s forward through torch.compile (inductor), compiled at its first call per input shape",
                 type(compiled).__name__)

    summary = RunSummary(run_dir, info)
    # SeedPerRank: several processes draw different dropout masks / samples (same model init everywhere)
    # NonFiniteGuard: NaN/inf updates skipped on all ranks; a streak of them stops the run (diverged)
    guard = NonFiniteGuard(cfg.trainer.get("max_bad_steps", 3))
    # (the guard runs before RunSummary so each step's `train/skipped_steps` is recorded with that step)
    callbacks = [guard, summary, SeedPerRank(cfg.seed), *_instantiate_dict(cfg.callbacks)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if cfg.stop_at_step:
        callbacks.append(StopAtStep(cfg.stop_at_step, dirpath=str(run_dir / "checkpoints")))
    plugins = []
    if SLURMEnvironment.detect():  # Slurm tasks (srun): our time-limit requeue, not Lightning's in-handler one
        slurm = SLURMEnvironment(auto_requeue=False)
        plugins.append(slurm)
        callbacks.append(SlurmRequeue(run_dir, slurm.requeue_signal))
    loggers = _instantiate_dict(cfg.logger)
    strategy = build_strategy(cfg.strategy, module)
    # what the stage declares it needs (stages/interface.py; ppo: no automatic clipping, interval in rollouts)
    stage_trainer_kwargs = module.trainer_overrides(cfg.trainer)
    trainer_cfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k != "max_bad_steps"}
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, strategy=strategy,
                                     plugins=plugins, **stage_trainer_kwargs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    close_process_group()

    diverged = guard.error(trainer)  # run.py: one line, exit 1 (summary.json says status=diverged)
    if not trainer.is_global_zero:
        if diverged:
            raise diverged
        return None
    # RunSummary wrote summary.json at fit end, with what the stage and callbacks declare
    # (SummarySource: sft's val_predictions, the samples, the guard's status)
    result = summary.written or {}
    print_summary(result, run_dir)
    if diverged:
        raise diverged
    metric = result.get(cfg.optimized_metric) if cfg.optimized_metric else None
    return float(metric) if isinstance(metric, (int, float)) and math.isfinite(metric) else None
