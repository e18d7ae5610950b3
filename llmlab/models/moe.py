"""Mixture-of-experts models: the router's load-balancing loss (Switch Transformer, Fedus et al. 2021, eqs. 4-6)
that Mixtral, Qwen3-MoE and other transformers MoE families add to their `labels=` loss when their config asks
(`output_router_logits`, weighted by `router_aux_loss_coef`). llmlab's stages add it the same way
(`stages.common.add_router_aux`), computed from the backbone's router logits over the real tokens."""
from __future__ import annotations

import sys

import torch

from llmlab.models.peft import transformers_model


def router_aux_coef(model) -> float:
    """The weight of the router's load-balancing loss (Switch Transformer eqs. 4-6) in the training loss: the
    model config's `router_aux_loss_coef` when the config asks for the loss (`output_router_logits`: Mixtral,
    Qwen3-MoE, ... add coef x aux to their own `labels=` loss then), else 0."""
    config = transformers_model(model).config
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def router_logits_off(model) -> dict:
    """`output_router_logits=False` (a forward or generate kwarg) for an MoE model whose config turns it on, else {}.

    Its own forward would compute the aux loss from whatever `attention_mask` it is given: a packed batch's is a
    (B, 1, T, T) mask (flattened as if it were (B, T): wrong counts, B x T x T floats) or none (padding counted),
    and in `generate`'s decode steps (B, T_so_far) against (B, 1) new tokens, which fails (transformers 5.25:
    "The size of tensor a (16) must match the size of tensor b (400)"). The policy's training forwards compute
    the loss themselves (`router_balance_loss`); others (reference, validation, generation) do not need it."""
    return {"output_router_logits": False} if getattr(transformers_model(model).config, "output_router_logits",
                                                      False) else {}


def router_balance_loss(inner, router_logits: tuple, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss of the model's routers over the real tokens: the model family's own
    `load_balancing_loss_func` (transformers, e.g. modeling_mixtral), given a (B, T) padding mask as its
    `labels=` path is given `attention_mask`; `router_logits`: one (B * T, n_experts) tensor per MoE layer."""
    func = sys.modules[type(inner).__module__].load_balancing_loss_func
    return func(router_logits, inner.num_experts, inner.num_experts_per_tok, token_mask)
