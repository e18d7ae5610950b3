"""Functions every stage shares: the masked forward, optimizers, token counting, the LM step, RL validation."""
from __future__ import annotations

import torch

from llmlab.checks.model import HEAD_APART_MODEL_TYPES
from llmlab.losses import causal_lm_loss_sum, chunked_causal_lm_loss_sum
from llmlab.models.attention import (
    DOCUMENT_SDPA,
    attn_implementation,
    packed_attention_kwargs,
)
from llmlab.models.moe import router_aux_coef, router_balance_loss, router_logits_off
from llmlab.models.peft import transformers_model, uses_virtual_tokens
from llmlab.optim import guard_optimizer, param_groups


def embedding_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None and emb.weight.dtype.is_floating_point else torch.float32


def forward_logits(model, batch: dict, packing: str = "document", router_aux: list | None = None) -> torch.Tensor:
    """Logits (B, T, V) for a batch from the collators.

    Batches with `segment_ids` (packed blocks, packed SFT, padded rows where padding has id -1) get a
    block-diagonal causal mask and per-document positions, unless packing is "concat".
    `router_aux`: a list the policy's training forwards pass; when the model asks for the router's
    load-balancing loss (`router_aux_coef`), that loss over the batch's real tokens is appended to it
    (`add_router_aux` adds it to the stage's loss).
    """
    if uses_virtual_tokens(model):  # prefix/prompt tuning: PEFT prepends virtual tokens to 2-D masks only
        return _virtual_token_logits(model, batch, packing)
    if router_aux is not None and router_aux_coef(model):
        hidden, head = _backbone(model, batch, packing, "the router's load-balancing loss",
                                 "set +model.config_overrides.output_router_logits=false", router_aux)
        return head(hidden)  # (B, T, V)
    return model(input_ids=batch["input_ids"], use_cache=False, **router_logits_off(model),
                 **_mask_kwargs(model, batch, packing)).logits


def real_tokens(batch: dict) -> torch.Tensor | None:
    """(B, T) 1 at real tokens, 0 at padding; None when every position is real."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] >= 0).long()
    if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
        return batch["attention_mask"]
    return None


def add_router_aux(module, loss: torch.Tensor, router_aux: list | None) -> torch.Tensor:
    """`loss` + coef x the router load-balancing loss of this micro-batch's policy forwards (their mean when a
    stage runs several, e.g. dpo's split halves), logged on its own as `train/router_aux_loss`; `loss` as is
    when the model does not ask for it (nothing in `router_aux`)."""
    if not router_aux:
        return loss
    aux = torch.stack([a.float() for a in router_aux]).mean()
    log_train(module, "train/router_aux_loss", aux)
    return loss + router_aux_coef(module.model) * aux.to(loss.dtype)


def mask_dtype(model) -> torch.dtype:
    """The dtype of the 4D block-diagonal mask `model` is given.

    SDPA takes a boolean mask (True: attend) whatever dtype its queries compute in; an additive float mask
    must match the query dtype, which no single tensor of the model tells: under QLoRA the frozen embedding
    is held in the bf16 compute dtype while fp32 norms make the queries fp32 (the mask used to be built in
    the embedding's dtype: "Expected attn_mask dtype to be bool or float or to match query dtype").
    Eager attention adds the mask to its fp32-promoted scores, so any float dtype works there: the autocast
    dtype under autocast, else the embedding's.
    """
    if attn_implementation(transformers_model(model)) in ("sdpa", DOCUMENT_SDPA):
        return torch.bool
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else embedding_dtype(model)


def _mask_kwargs(model, batch: dict, packing: str) -> dict:
    """attention_mask (and position_ids for document-masked packed rows) for a batch from the collators."""
    if "segment_ids" in batch and packing == "document":  # the cheapest form the model's attention takes
        return packed_attention_kwargs(transformers_model(model), batch["segment_ids"], batch["position_ids"],
                                       lambda: mask_dtype(model))
    if "attention_mask" in batch:
        return {"attention_mask": batch["attention_mask"]}
    return {}


def forward_hidden(model, batch: dict, packing: str = "document", router_aux: list | None = None):
    """The final hidden states (B, T, H) and the output layer (hidden -> logits), for a loss that applies the
    head itself (`chunked_causal_lm_loss_sum`); the same masking (and `router_aux`) as `forward_logits`."""
    if uses_virtual_tokens(model):
        raise ValueError("stage.module.loss_chunk_tokens does not apply to prefix/prompt tuning (PEFT runs their "
                         "virtual tokens inside its own forward): set stage.module.loss_chunk_tokens=null")
    return _backbone(model, batch, packing, "stage.module.loss_chunk_tokens", "set stage.module.loss_chunk_tokens=null",
                     router_aux if router_aux_coef(model) else None)


def _backbone(model, batch: dict, packing: str, what: str, fix: str, router_aux: list | None):
    """(hidden (B, T, H), output layer): the transformers model's backbone (`base_model`: GPT-2's
    `transformer`, OPT's/Llama's/Mixtral's `model`) with PEFT's adapters in it, whose output is what the
    causal-LM class feeds its head. With `router_aux` (a list) it also returns each MoE layer's router logits,
    whose load-balancing loss over the real tokens is appended to the list."""
    inner = transformers_model(model)
    model_type = getattr(inner.config, "model_type", None)
    if model_type not in HEAD_APART_MODEL_TYPES or inner.base_model is inner:
        raise ValueError(f"{what}: model type {model_type!r} is not one whose head can be applied apart "
                         f"({', '.join(HEAD_APART_MODEL_TYPES)}); {fix}")
    extra = {"output_router_logits": True} if router_aux is not None else router_logits_off(model)
    out = inner.base_model(input_ids=batch["input_ids"], use_cache=False, **extra,
                           **_mask_kwargs(model, batch, packing))
    if router_aux is not None:
        router_aux.append(router_balance_loss(inner, out.router_logits, real_tokens(batch)))
    return out.last_hidden_state, inner.get_output_embeddings()


def _virtual_token_logits(model, batch: dict, packing: str) -> torch.Tensor:
    """Logits (B, T, V) under prefix/prompt tuning: a 2-D padding mask, so one example per row.

    A block-diagonal mask cannot be extended by PEFT's virtual tokens, so packed rows are refused
    (llmlab/checks/ refuses the settings earlier); prompt tuning's logits for the virtual tokens are dropped.
    """
    mask = batch.get("attention_mask")
    if "segment_ids" in batch and packing == "document":
        if int(batch["segment_ids"].max()) > 0:
            raise ValueError("prefix/prompt tuning cannot attend within packed examples: set "
                             "data.pack_examples=false (sft) or data.packing=concat (pretrain)")
        mask = (batch["segment_ids"] >= 0).long()  # (B, T)
    T = batch["input_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
    return logits[:, -T:]  # (B, T, V)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them: (B, T) -> (B, T)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def configure_optimizers(module, optimizer_factory, scheduler_factory):
    """AdamW-style groups (no decay on 1-D params) + a per-step LR schedule over the whole run.

    The optimizer skips a non-finite update on all ranks together (`llmlab.optim.guard_optimizer`);
    its guard is `module.step_guard`, read by `llmlab.callbacks.nonfinite.NonFiniteGuard`.
    """
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    optimizer = optimizer_factory(param_groups(module, weight_decay))
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # a fused torch optimizer (AdamW(fused=True)) can unscale fp16 gradients inside its step, so
        # Lightning's mixed-precision plugin refuses gradient clipping with it, even under bf16 where
        # nothing is scaled. Without the flag GradScaler unscales before clipping (fp16) and bf16 has no
        # scaler: the fused kernel then gets true gradients, the same update.
        optimizer._step_supports_amp_scaling = False
    module.step_guard = guard_optimizer(optimizer)
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer, total_steps=module.trainer.estimated_stepping_batches)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def step_mean(module, total: torch.Tensor, batch: dict, key: str, count) -> torch.Tensor:
    """This micro-batch's share of the optimizer step's mean: total x (micro-batches x ranks) / step count.

    `total` is a sum over this micro-batch's `count` targets (tokens, pairs). Lightning divides the
    returned loss by `accumulate_grad_batches` and DDP/ZeRO average gradients over ranks, so what is
    optimized is sum over the step / the step's global count (`batch["step_<key>"]`, from
    datamodule.StepTargets): the same update as one big batch, however it is split. The mean of the
    returned values over the step's micro-batches and ranks is that same number, so `log_train` of it
    logs the step's token-weighted mean. Without the key (a batch not from the datamodule, validation)
    it is the plain per-batch mean, total / count.
    """
    step_count = batch.get(f"step_{key}")
    trainer = module._trainer
    if step_count is None or trainer is None:
        return total / torch.as_tensor(count).clamp_min(1)
    micro_batches_x_ranks = trainer.accumulate_grad_batches * trainer.world_size
    return total * micro_batches_x_ranks / step_count.to(total.device).clamp_min(1)


def for_backward(module, loss: torch.Tensor) -> torch.Tensor:
    """The loss a `training_step` returns, given the loss it means (and logs).

    Lightning divides the returned loss by `accumulate_grad_batches`; under DeepSpeed the engine's
    `backward` divides it by its gradient_accumulation_steps (set from the same number) once more
    (lightning/pytorch/plugins/precision/deepspeed.py calls `engine.backward(loss)` with
    scale_wrt_gas=True), so without this the gradient of a ZeRO run would be 1/accumulation of DDP's.
    """
    trainer = module._trainer
    if trainer is not None and trainer.strategy.handles_gradient_accumulation:
        return loss * trainer.accumulate_grad_batches
    return loss


def log_train(module, name: str, value, prog_bar: bool = False) -> None:
    """Log a training scalar once per optimizer step: its mean over the step's micro-batches and ranks.

    Lightning's `self.log` logs each micro-batch, so under gradient accumulation users would see the
    *last* micro-batch's loss, and under DDP/ZeRO rank 0's. The optimized quantity is the mean over all
    of them: Lightning scales each micro-batch's loss by 1/accumulation and DDP/DeepSpeed average the
    ranks' gradients. So batch 8 x accumulation 1, batch 4 x accumulation 2, and 2 ranks x batch 4 log
    the same number (axolotl#2262). Collective under DDP/DeepSpeed (`sync_dist`): every rank calls it
    for the same micro-batches. Losses from `step_mean` are already weighted so that this plain mean
    over micro-batches and ranks is the step's token-weighted mean.
    """
    trainer = module._trainer
    value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
    sums = module.__dict__.setdefault("_llmlab_step_sums", {})
    total, count = sums.pop(name, (0.0, 0))
    total, count = total + value, count + 1
    if trainer is not None and module.automatic_optimization and trainer.fit_loop._should_accumulate():
        sums[name] = (total, count)  # more micro-batches to come before the optimizer steps
        return
    module.log(name, total / count, prog_bar=prog_bar, sync_dist=True)


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch: what tokens/s counts."""
    mask = real_tokens(batch)
    return int(batch["input_ids"].numel() if mask is None else mask.sum())


def lm_training_step(module, batch: dict) -> torch.Tensor:
    """The causal-LM step of pretrain and sft: token-weighted over the whole optimizer step (see step_mean),
    plus coef x the router's load-balancing loss when an MoE model's config asks for it."""
    chunk = getattr(module, "loss_chunk_tokens", None)
    router_aux = []
    if chunk:  # the head applied chunk by chunk: the (B, T, V) logits are never held at once
        hidden, head = forward_hidden(module.model, batch, module.packing, router_aux)  # (B, T, H)
        loss_sum, n_tokens = chunked_causal_lm_loss_sum(hidden, head, batch["labels"], chunk)
    else:
        logits = forward_logits(module.model, batch, module.packing, router_aux)  # (B, T, V)
        loss_sum, n_tokens = causal_lm_loss_sum(logits, batch["labels"])
    loss = add_router_aux(module, step_mean(module, loss_sum, batch, "tokens", n_tokens), router_aux)
    log_train(module, "train/loss", loss, prog_bar=True)  # = the step's token-weighted mean (+ coef x aux)
    return for_backward(module, loss)


def log_answer_validation(module, answers: list[str], score: torch.Tensor, references: list) -> None:
    """Validation of the RL stages (ppo, grpo): the mean reward (B,) of the greedy answers and, when every
    prompt has a reference answer, their exact match (`module.val_reward`, `module.val_exact_match`)."""
    module.val_reward.update(score.mean(), weight=score.numel())
    module.log("val/reward_mean", module.val_reward, prog_bar=True)
    if all(a is not None for a in references):
        module.val_exact_match.update(answers, references)
        module.log("val/exact_match", module.val_exact_match)


def sum_over_ranks(module, value) -> float:
    """The sum of a per-process scalar over all processes (DDP / DeepSpeed), the same on every rank.
    Collective (every rank calls it); identity on one process."""
    if module._trainer is None or module.trainer.world_size <= 1:
        return float(value)
    return mean_over_ranks(module, value) * module.trainer.world_size


def mean_over_ranks(module, value) -> float:
    """The mean of a per-process scalar over all processes, so decisions taken from it (ppo's KL
    coefficient and early stop, grpo's refills) are the same on every rank. Collective; identity on one."""
    if module._trainer is None or module.trainer.world_size <= 1:
        return float(value)
    tensor = torch.tensor(float(value), device=module.device, dtype=torch.float64)
    return float(module.trainer.strategy.reduce(tensor, reduce_op="mean"))


def first_and_last_tenth(history: list) -> tuple[list, list]:
    """The first and last tenth (at least one row each) of a per-iteration history: summary.json's
    `*_first` / `*_last` of the RL stages."""
    k = max(1, len(history) // 10)
    return history[:k], history[-k:]
