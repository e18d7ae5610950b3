"""Mixture-of-experts models (issue 21 point 4): the router's load-balancing loss in the training loss when the
model's config asks for it, checked against transformers' own `labels=` loss; which parameters LoRA adapts.

Tiny random Mixtral and Qwen3-MoE dirs (tests/families.py: 2 layers, 64 wide, 4 experts, top-2)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import llmlab.run  # noqa: F401 (registers the config resolvers: llmlab_model_name names model=hf runs)
from llmlab.models.build import build_tokenizer
from llmlab.stages.build import build_stage
from tests.test_config import compose_resolved

MOE = ("mixtral", "qwen3_moe")
AUX_ON = ["+model.config_overrides.output_router_logits=true"]


def sft_module(model_dir, *overrides):
    cfg, _ = compose_resolved(["stage=sft", "model=hf", f"model.pretrained={model_dir}", *overrides])
    return build_stage(cfg, build_tokenizer(cfg.model))


def one_step(module, batch) -> dict[str, float]:
    """One real optimizer step through Lightning; the step's logged metrics (what was logged is computed before
    the update, so it is the loss of the weights the reference model has)."""
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def padded_batch(vocab: int) -> dict:
    """Two rows (B=2, T=12), the second right-padded after 7 tokens; labels -100 on each row's 3-token prompt and
    on padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_form(batch: dict) -> dict:
    """The same two examples laid end to end in one row (1, 19) + 5 padding: segment ids 0, 1, then -1."""
    lengths = batch["attention_mask"].sum(-1).tolist()  # [12, 7]
    T = sum(lengths) + 5
    ids = torch.zeros(1, T, dtype=torch.long)
    labels = torch.full((1, T), -100)
    segments = torch.full((1, T), -1)
    positions = torch.zeros(1, T, dtype=torch.long)
    start = 0
    for row, n in enumerate(lengths):
        ids[0, start:start + n] = batch["input_ids"][row, :n]
        labels[0, start:start + n] = batch["labels"][row, :n]
        segments[0, start:start + n] = row
        positions[0, start:start + n] = torch.arange(n)
        start += n
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "position_ids": positions}


@pytest.mark.parametrize("model_type", MOE)
def test_sft_loss_with_router_aux_equals_transformers(family_dir, model_type):
    """Independent check: llmlab's sft step loss on an unpacked, padded batch equals transformers'
    `model(input_ids, attention_mask, labels=...).loss` (its LM loss + router_aux_loss_coef x aux_loss), and the
    logged train/router_aux_loss equals its `aux_loss`; the same two examples packed into one row (document
    masks, padding as segment -1) give the same numbers: padding is not counted by the router loss either."""
    model_dir = family_dir(model_type)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=True).eval()
    batch = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(**batch)
    coef = reference.config.router_aux_loss_coef
    assert coef > 0 and expected.aux_loss > 0

    unpacked = one_step(sft_module(model_dir, *AUX_ON), batch)
    packed = one_step(sft_module(model_dir, *AUX_ON), packed_form(batch))
    for logged in (unpacked, packed):
        assert logged["train/router_aux_loss"] == pytest.approx(float(expected.aux_loss), rel=1e-5)
        assert logged["train/loss"] == pytest.approx(float(expected.loss), rel=1e-5)
    # the aux term is really in it: without it the loss is transformers' plain LM loss
    with torch.no_grad():
        lm_only = reference(**batch, output_router_logits=False).loss
    assert float(expected.loss) - float(lm_only) == pytest.approx(coef * float(expected.aux_loss), rel=1e-4)


def test_published_default_keeps_the_router_loss_off(family_dir):
    """Mixtral's config leaves output_router_logits off: the step optimizes the LM loss alone, nothing logged as
    router loss (transformers' `labels=` loss without router logits: the same number)."""
    model_dir = family_dir("mixtral")
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reference.config.output_router_logits is False
    batch = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(**batch).loss
    logged = one_step(sft_module(model_dir), batch)
    assert "train/router_aux_loss" not in logged
    assert logged["train/loss"] == pytest.approx(float(expected), rel=1e-5)
