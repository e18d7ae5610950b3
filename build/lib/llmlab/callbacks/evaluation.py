"""LMEvalCallback: run an lm-eval task set (conf/eval/<name>.yaml) during training, logged like validation.

    python -m llmlab.run stage=sft callbacks=with_eval                       # builtin, limit 50, every validation
    python -m llmlab.run stage=sft +callbacks.lm_eval._target_=llmlab.callbacks.evaluation.LMEvalCallback \
        +callbacks.lm_eval.every_n_steps=200 +callbacks.lm_eval.limit=100

It runs at the end of a validation whose step is a multiple of `every_n_steps` (null: every validation,
the one before step 0 included), and logs `val/<task>/<metric>` (summary.json: `val_<task>_<metric>_first`
/ `_last`; metrics.csv, TensorBoard, W&B through Lightning's loggers).

Distributed (DDP, ZeRO): rank 0 evaluates (lm-eval sees one process, no collective runs inside it; it
returns results on local rank 0 only), the other ranks wait, then rank 0's numbers are broadcast and
every rank logs them. Under ZeRO-3 the ranks hold shards: all ranks enter
`generation.generation_context` (the full weights gathered once, DeepSpeed's per-layer hooks off, so
rank 0's forwards need no other rank), which needs the whole model in each process's memory. The cost
is the evaluation's time on rank 0, during which the others idle.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

from llmlab.distributed.precision import autocast_dtype
from llmlab.errors import ConfigError
from llmlab.evaluation.generation import generation_context
from llmlab.evaluation.harness import check_task_set, evaluate, load_task_set

log = logging.getLogger("llmlab")


class LMEvalCallback(L.Callback):
    def __init__(self, task_set="builtin", every_n_steps: int | None = None, limit: int | float | None = 50,
                 batch_size: int = 8, num_fewshot: int | None = None, gen_kwargs: dict | None = None,
                 template: str | None = None, text_file: str | None = None):
        self.task_set = load_task_set(task_set)
        if text_file is not None:
            self.task_set.text_file = text_file
        check_task_set(self.task_set)  # before training starts: a typo'd task or offline hub fails now
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ConfigError(f"callbacks.lm_eval.every_n_steps={every_n_steps!r}: give an integer >= 1 (a multiple "
                              f"of trainer.val_check_interval) or null (every validation)")
        self.every_n_steps, self.limit, self.batch_size = every_n_steps, limit, batch_size
        self.num_fewshot, self.gen_kwargs, self.template = num_fewshot, dict(gen_kwargs or {}), template
        self.evaluated_steps: list[int] = []

    def setup(self, trainer, pl_module, stage):
        interval = trainer.val_check_interval
        if self.every_n_steps and isinstance(interval, int) and self.every_n_steps % interval:
            raise ConfigError(f"callbacks.lm_eval.every_n_steps={self.every_n_steps}: it runs after a validation, "
                              f"so give a multiple of trainer.val_check_interval={interval}")

    def on_validation_epoch_end(self, trainer, pl_module):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps:
            return
        base = pl_module.model.get_base_model() if hasattr(pl_module.model, "get_base_model") else pl_module.model
        if not callable(getattr(base, "generate", None)):
            return  # stage=rm: a classifier has no log-likelihoods to score
        dtype = autocast_dtype(trainer.precision)  # as validation ran: bf16-mixed -> bf16 autocast
        autocast = getattr(torch, dtype) if dtype else None
        result = None
        with generation_context(pl_module.model, trainer.strategy):  # ZeRO-3: gathered; else a no-op
            if trainer.is_global_zero:  # lm-eval returns results on local rank 0 only (LOCAL_RANK)
                result = evaluate(pl_module.model, pl_module.tokenizer, self.task_set, limit=self.limit,
                                  num_fewshot=self.num_fewshot, batch_size=self.batch_size,
                                  gen_kwargs=self.gen_kwargs or None, template=self.template,
                                  autocast_dtype=autocast)
            if trainer.world_size > 1:  # the other ranks wait here, then log the same numbers
                result = trainer.strategy.broadcast(result, src=0)
        for task, r in result["tasks"].items():
            for name, value in r["metrics"].items():
                if value is not None:
                    pl_module.log(f"val/{task}/{name}", float(value), sync_dist=False)
        self.evaluated_steps.append(step)
        if trainer.is_global_zero:
            log.info("lm-eval at step %d (%.1f s): %s", step, result["seconds"],
                     ", ".join(f"{t}/{k}={v:.4f}" for t, r in result["tasks"].items()
                               for k, v in r["metrics"].items() if v is not None))
