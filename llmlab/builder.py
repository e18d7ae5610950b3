"""Build a stage's LightningModule from the composed config: model (+PEFT) first, then the stage.

Every stage module takes `model` and `tokenizer` plus its own `stage.module` arguments; the model's
head (causal LM or one-output classifier) comes from `stage.head`.
"""
from __future__ import annotations

from hydra.utils import get_class, instantiate

from llmlab.models import build_model
from llmlab.peft import apply_peft, quantization_config


def stage_class(stage_cfg):
    return get_class(stage_cfg.module._target_)


def build_stage(cfg, tokenizer):
    head = cfg.stage.get("head", "causal_lm")
    if cfg.get("dry_run") and cfg.model.init == "scratch":
        # counts and memory need shapes only: build on the meta device (no memory, no init time; an
        # OPT-1.3B dry run takes seconds). QLoRA is then counted as LoRA on a 4-bit base.
        import torch

        with torch.device("meta"):
            model = apply_peft(build_model(cfg.model, tokenizer, head=head), cfg.peft, head=head)
            return instantiate(cfg.stage.module, model=model, tokenizer=tokenizer, _recursive_=True)
    model = build_model(cfg.model, tokenizer, head=head,
                        quantization_config=quantization_config(cfg.peft, cfg.trainer.precision))
    model = apply_peft(model, cfg.peft, head=head)
    return instantiate(cfg.stage.module, model=model, tokenizer=tokenizer, _recursive_=True)
