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
    # the difference of two float32 losses of ~6 carries their rounding (~5e-7 each): an absolute tolerance, not 1e-4
    # of the ~2e-3 difference (a tokenizer trained on other text gave 2.0423e-3 vs 2.0421e-3)
    assert float(expected.loss) - float(lm_only) == pytest.approx(coef * float(expected.aux_loss), abs=2e-6)


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


def trained(module, batch, steps: int) -> tuple[dict, dict]:
    """(parameters before, after) `steps` optimizer steps on `batch`, by name, as plain tensors."""
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return before, {n: p.detach() for n, p in module.model.named_parameters()}


def adapted(names) -> set[str]:
    """Layer 0's adapted tensors without the PEFT prefix and adapter name: {'self_attn.q_proj.lora_A', ...}."""
    return {n.split(".layers.0.", 1)[1].replace(".default.weight", "") for n in names if ".layers.0." in n}


ATTENTION = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
# PEFT wraps the fused experts module once per targeted parameter: the outer wrapper adapts experts.down_proj
# (lora_A (r, F), lora_B (H, r) per expert block), the inner (`base_layer`) experts.gate_up_proj
EXPERTS = {"mlp.experts", "mlp.experts.base_layer"}


@pytest.mark.parametrize("model_type, experts, modules", [
    ("mixtral", False, {"self_attn.q_proj", "self_attn.v_proj"}),  # PEFT's table entry
    ("mixtral", True, {"self_attn.q_proj", "self_attn.v_proj"} | EXPERTS),
    ("qwen3_moe", False, ATTENTION),  # no table entry: llmlab's every-nn.Linear fallback, which is attention here
    ("qwen3_moe", True, ATTENTION | EXPERTS),  # opt-in: peft.target_parameters, dropout 0
])
def test_lora_adapts_exactly_the_stated_tensors_and_training_changes_only_those(family_dir, tmp_path, model_type,
                                                                               experts, modules):
    """conf/peft/lora.yaml's choice for MoE: attention by default, the experts' fused tensors when asked, the
    router never. After 3 steps the changed tensors are exactly the trainable ones (A changes from step 2, once
    B is non-zero), and the router's and experts' base weights are untouched."""
    extra = ["peft.target_parameters=[experts.gate_up_proj,experts.down_proj]", "peft.dropout=0"] if experts else []
    module = sft_module(family_dir(model_type), "peft=lora", *extra)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert adapted(trainable) == {f"{m}.lora_{ab}" for m in modules for ab in "AB"}
    assert not any("gate" in n and "gate_up" not in n for n in trainable)  # the router is never adapted
    before, after = trained(module, padded_batch(module.model.config.vocab_size), steps=3)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    n_trainable = sum(p.numel() for n, p in module.model.named_parameters() if p.requires_grad)
    assert n_trainable == {("mixtral", False): 7_168, ("mixtral", True): 72_704, ("qwen3_moe", False): 14_336,
                           ("qwen3_moe", True): 43_008}[model_type, experts]  # the numbers lora.yaml quotes
    if experts:  # the hf/ export merges the expert adapters too: the same logits as the trained module
        from llmlab.models.export import merged_model, save_adapter

        save_adapter(module.model, None, tmp_path / "adapter")
        batch = padded_batch(module.model.config.vocab_size)
        module.model.eval()
        with torch.no_grad():
            trained_logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            merged = merged_model(module.model, tmp_path / "adapter")
            merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-4, atol=1e-5)


def test_expert_adapters_need_dropout_zero(family_dir):
    """PEFT refuses dropout on fused parameters deep inside get_peft_model; llmlab says so before weights load."""
    from llmlab.checks.model import check_peft_settings
    from llmlab.errors import ConfigError

    cfg, _ = compose_resolved(["stage=sft", "model=hf", f"model.pretrained={family_dir('qwen3_moe')}", "peft=lora",
                               "peft.target_parameters=[experts.gate_up_proj,experts.down_proj]"])
    with pytest.raises(ConfigError, match=r"peft.target_parameters=.*peft.dropout=0.05.*set peft.dropout=0"):
        check_peft_settings(cfg)


@pytest.mark.parametrize("split_pairs", [False, True])
def test_dpo_adds_the_router_loss_of_the_policy_rows(family_dir, split_pairs):
    """stage=dpo on Mixtral with the router loss on: at step 0 the policy equals its frozen reference, so the DPO
    loss is log 2 exactly and the step's loss is log 2 + coef x aux, where aux is transformers' aux_loss over the
    pairs' real tokens (split_pairs: the mean of the chosen half's and the rejected half's). share_prompt is
    asked for and skipped: the router loss needs the full rows' forward."""
    import math
    from functools import partial

    from transformers import AutoTokenizer

    from llmlab.stages.dpo import DPOModule
    from tests.test_dpo import pref_batch

    model_dir = family_dir("mixtral")
    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=True).eval()
    _, _, batch = pref_batch(tok, n=4)
    assert int(batch["segment_ids"].max()) == 0  # one sequence per row: transformers sees the same rows
    ids, mask, B = batch["input_ids"], (batch["segment_ids"] >= 0).long(), batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        halves = (slice(0, B), slice(B, 2 * B)) if split_pairs else (slice(0, 2 * B),)
        aux = sum(float(reference(input_ids=ids[h], attention_mask=mask[h]).aux_loss) for h in halves) / len(halves)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, output_router_logits=True)
    module = DPOModule(policy, tok, optimizer=partial(torch.optim.AdamW, lr=1e-3), eval_generation=False,
                       share_prompt=True, split_pairs=split_pairs)
    logged = one_step(module, batch)
    assert logged["train/router_aux_loss"] == pytest.approx(aux, rel=1e-5)
    coef = reference.config.router_aux_loss_coef
    assert logged["train/loss"] == pytest.approx(math.log(2) + coef * aux, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["stage=grpo"], r"stage=grpo does not add it to its loss.*output_router_logits=false"),
    (["peft=prefix", "data.pack_examples=false"], r"with peft=prefix: PEFT's virtual-token forward"),
])
def test_router_loss_where_no_stage_adds_it_is_refused_before_weights_load(family_dir, overrides, message):
    """Silently training without the loss the config asks for would be worse than one line with the fix."""
    from llmlab.checks.model import check_architecture
    from llmlab.errors import ConfigError

    cfg, _ = compose_resolved(["model=hf", f"model.pretrained={family_dir('qwen3_moe')}", *AUX_ON,
                               *(overrides if overrides[0].startswith("stage=") else ["stage=sft", *overrides])])
    with pytest.raises(ConfigError, match=message):
        check_architecture(cfg)
