"""Build a stage's LightningModule from the composed config: model (+PEFT) first, then the stage.

Every stage module takes `model` and `tokenizer` plus its own `stage.module` arguments; the model's
head (causal LM or one-output classifier) comes from `stage.head`.
"""
from __future__ import annotations

import torch
from hydra.utils import get_class, instantiate

from llmlab.errors import ConfigError
from llmlab.models.build import build_model
from llmlab.models.peft import apply_peft, peft_for_strategy, quantization_config
from llmlab.stages.interface import Stage


def stage_class(stage_cfg):
    """The stage's LightningModule class; it must be a `llmlab.stages.interface.Stage` (what the run reads
    from a stage is declared there)."""
    cls = get_class(stage_cfg.module._target_)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"stage.module._target_={stage_cfg.module._target_}: not an llmlab stage; "
                          f"subclass llmlab.stages.interface.Stage (a LightningModule with the members the run reads)")
    return cls


def build_stage(cfg, tokenizer):
    head = cfg.stage.get("head", "causal_lm")
    if cfg.get("dry_run") and cfg.model.init == "scratch":
        # counts and memory need shapes only: build on the meta device (no memory, no init time; an
        # OPT-1.3B dry run takes seconds). QLoRA is then counted as LoRA on a 4-bit base.
        with torch.device("meta"):
            model = apply_peft(build_model(cfg.model, tokenizer, head=head), cfg.peft, head=head)
            return instantiate(cfg.stage.module, model=model, tokenizer=tokenizer, _recursive_=True)
    # QLoRA under ZeRO-3: 4-bit weights packed in the compute dtype so DeepSpeed can partition them
    peft_cfg = peft_for_strategy(cfg.peft, cfg.get("strategy"), cfg.trainer.precision)
    model = build_model(cfg.model, tokenizer, head=head,
                        quantization_config=quantization_config(peft_cfg, cfg.trainer.precision))
    model = apply_peft(model, peft_cfg, head=head)
    keep_4bit_layout(model)
    try:
        return instantiate(cfg.stage.module, model=model, tokenizer=tokenizer, _recursive_=True)
    except Exception as err:  # a ConfigError from a nested node (e.g. a reward) arrives wrapped by Hydra
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes re-packing 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad (validation, generation)
    replaces `weight.data` with another layout once and flags its quant state; a later training forward
    then fails ("a view of a leaf Variable that requires grad is being used in an in-place operation",
    bitsandbytes 0.50), and under ZeRO-3 the swap would be undone by the next gather while the flag
    stays. Training keeps the one layout the weights were quantized in.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
