"""`stage.module.loss_chunk_tokens` (pretrain, sft): the causal-LM loss from the backbone's hidden states with
the output layer applied N target tokens at a time (llmlab.losses.chunked_causal_lm_loss_sum,
llmlab.stages.common.forward_hidden).

It must be the same training as the full-logits path: the same loss sum, token count and gradients on
GPT-2, OPT (with and without its `project_out`) and Llama, on packed document-masked rows with ignored
(prompt) positions, fully trained (the tied embedding/head gets both gradients) and under LoRA, at fp32 and
bf16 autocast; and it must not keep the (B, T, V) logits for backward, which is its point.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from llmlab.errors import ConfigError
from llmlab.losses import IGNORE_INDEX, causal_lm_loss_sum, chunked_causal_lm_loss_sum
from llmlab.stages.common import forward_hidden, forward_logits
from tests.conftest import CONF, FAST, assert_ok
from tests.test_packing import ARCHS

VOCAB = 100
# test_packing's architectures (Mixtral's head is a plain lm_head too: llmlab.checks.model.HEAD_APART_MODEL_TYPES): the
# chunked loss applies the head apart only for heads it knows (`forward_hidden`), and refuses others in one line
# (Gemma 2's logit soft-capping: test below)
ARCHS_HERE = {**ARCHS,
              "opt_project_out": ("opt", dict(ARCHS["opt"], word_embed_proj_dim=16))}


def tiny_model(name: str, peft: str):
    arch, kwargs = ARCHS_HERE[name] if isinstance(ARCHS_HERE[name], tuple) else (name, ARCHS_HERE[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs))
    if peft == "lora":
        from llmlab.models.peft import apply_peft

        node = OmegaConf.load(CONF / "peft" / "lora.yaml")
        # PEFT's all-linear also wraps Mixtral's fused expert tensors, which it refuses with lora_dropout > 0
        # (llmlab.models.peft.linear_layer_names): there, llmlab's default (attention)
        node.target_modules = None if arch == "mixtral" else "all-linear"
        model = apply_peft(model, node)
        for name, param in model.named_parameters():  # B != 0, so every adapter matrix gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return model.eval()  # dropout off: the two paths must see the same network (gradients flow in eval mode too)


def packed_batch() -> dict:
    """Two rows of 24 tokens, each two documents plus padding (segment -1), prompts ignored like SFT's."""
    g = torch.Generator().manual_seed(1)
    segments = torch.tensor([[0] * 10 + [1] * 12 + [-1] * 2, [0] * 15 + [1] * 9])  # (2, 24)
    positions = torch.zeros_like(segments)
    for row in range(2):
        for seg in segments[row].unique():
            where = segments[row] == seg
            positions[row, where] = torch.arange(int(where.sum()))
    ids = torch.randint(1, VOCAB, segments.shape, generator=g)
    labels = ids.clone()
    labels[segments < 0] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX  # a prompt
    labels[0, 10:13] = IGNORE_INDEX  # the second document's prompt
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "position_ids": positions}


def loss_and_grads(model, batch, chunk: int | None):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        loss_sum, n = causal_lm_loss_sum(forward_logits(model, batch), batch["labels"])
    else:
        hidden, head = forward_hidden(model, batch)
        loss_sum, n = chunked_causal_lm_loss_sum(hidden, head, batch["labels"], chunk)
    loss_sum.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), int(n), grads


@pytest.mark.parametrize("precision", ["32", "bf16"])
@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("arch", sorted(ARCHS_HERE))
def test_same_loss_and_gradients_as_full_logits(arch, peft, precision):
    model, batch = tiny_model(arch, peft), packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ref_loss, ref_n, ref_grads = loss_and_grads(model, batch, None)
        loss, n, grads = loss_and_grads(model, batch, 5)  # 5 does not divide the 35 targets: a short last chunk
    assert n == ref_n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 35
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)  # bf16 too: the same logits, summed in fp32
    assert sorted(grads) == sorted(ref_grads) and len(grads) > 0
    for name, ref in ref_grads.items():
        # every trainable tensor is reached (embeddings, head, adapters), but a key projection's bias: it adds
        # q . b to every score of a query alike, which softmax ignores, so its gradient is 0 in exact arithmetic
        # and float rounding leaves it 0 or ~1e-10 by thread count (OPT, serial run: exactly 0)
        assert ref.abs().max() > 0 or name.endswith("k_proj.bias"), name
        # bf16: the head's weight gradient is summed over chunks in bf16 (measured <= 0.8% of its largest entry)
        tol = 1e-4 if precision == "32" else 2e-2
        torch.testing.assert_close(grads[name], ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-8, msg=name)


def test_a_head_it_does_not_know_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **ARCHS["llama"], head_dim=16))
    with pytest.raises(ValueError, match=r"model type 'gemma2' is not one whose head.*loss_chunk_tokens=null"):
        forward_hidden(model, packed_batch())


def test_full_vocabulary_logits_are_not_kept_for_backward():
    """Every tensor autograd saves, by shape: the full path keeps (B, T-1, V)-sized logits, the chunked one at
    most a chunk's rows of anything vocabulary-wide."""
    model, batch = tiny_model("gpt2", "none"), packed_batch()
    B, T = batch["input_ids"].shape

    def saved_vocab_rows(chunk):
        rows = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == VOCAB and t.dtype.is_floating_point:
                rows.append(t.numel() // VOCAB)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_and_grads(model, batch, chunk)
        return rows

    assert max(saved_vocab_rows(None)) >= B * (T - 1)
    assert max(saved_vocab_rows(5), default=0) <= 5


def test_unsupported_settings_are_refused_before_weights_load():
    from hydra import compose, initialize_config_dir

    from llmlab.checks.model import check_loss_chunking

    def refused(*overrides) -> str:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*FAST, *overrides])
        with pytest.raises(ConfigError) as err:
            check_loss_chunking(cfg)
        return str(err.value)

    assert "e.g. 1024" in refused("stage.module.loss_chunk_tokens=0")
    assert "e.g. 1024" in refused("stage.module.loss_chunk_tokens=true")
    assert "compile=true" in refused("stage.module.loss_chunk_tokens=64", "compile=true")
    assert "peft=prompt" in refused("stage.module.loss_chunk_tokens=64", "peft=prompt")
    message = refused("stage.module.loss_chunk_tokens=64", "model.config.model_type=gemma2")
    assert "'gemma2'" in message and "loss_chunk_tokens=null" in message


@pytest.mark.slow  # two tiny training runs: pretrain and sft with chunks vs. without
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_training_run_has_the_same_losses(cli, tmp_path, stage):
    """Through llmlab.run: the logged training losses of a run with chunks equal those of the same run without."""
    import json

    common = [*FAST, "trainer.log_every_n_steps=1", "callbacks.samples=null", "callbacks.hf_export=null"]
    if stage == "sft":
        common = ["stage=sft", "model=tiny", *common]
    histories = {}
    for name, chunk in (("full", "null"), ("chunked", "37")):
        assert_ok(cli(*common, f"stage.module.loss_chunk_tokens={chunk}", run_dir=tmp_path / name))
        histories[name] = dict(json.loads((tmp_path / name / "history.json").read_text())["train/loss"])
    ref, got = histories["full"], histories["chunked"]
    assert sorted(got) == sorted(ref) and len(ref) == 6
    for step, value in ref.items():
        assert got[step] == pytest.approx(value, rel=1e-4), step


def test_dry_run_estimate_counts_one_chunk_of_logits():
    """dry_run's memory estimate (llmlab/distributed/memory.py) on model=opt1.3b (meta device): with loss_chunk_tokens the
    loss's fp32 logits term is that of one chunk (3 copies x N x V x 4 bytes), the rest unchanged."""
    from llmlab.stages.build import build_stage
    from llmlab.distributed.memory import GIB, estimate_for_run
    from tests.test_peft import compose_cfg

    settings = ("model=opt1.3b", "model.init=scratch", "peft=lora", "dry_run=true", "data.batch_size=2",
                "data.block_size=1024", "precision=bf16-mixed")
    full_cfg, chunk_cfg = compose_cfg(*settings), compose_cfg(*settings, "stage.module.loss_chunk_tokens=256")
    full, chunked = (estimate_for_run(cfg, build_stage(cfg, None)) for cfg in (full_cfg, chunk_cfg))
    assert chunked["weights_gib"] == full["weights_gib"] and chunked["loss_chunk_tokens"] == 256
    saved = 3 * (2 * 1024 - 256) * 50272 * 4 / GIB  # ~1.0 GiB of the 2 x 1024-token batch's logits
    assert full["activations_gib"] - chunked["activations_gib"] == pytest.approx(saved, abs=2e-3)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_chunked_loss_equals_transformers_own_loss(arch):
    """The independent reference: transformers' `model(input_ids, attention_mask, labels=labels).loss` (its
    ForCausalLMLoss: shift, mean over non-ignored targets) on right-padded rows with masked prompts equals
    the chunked sum / token count."""
    model = tiny_model(arch, "none")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding
    mask[2, 11:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX  # prompts
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        hidden, head = forward_hidden(model, {"input_ids": ids, "attention_mask": mask})
        loss_sum, n = chunked_causal_lm_loss_sum(hidden, head, labels, 4)
    assert float(loss_sum / n) == pytest.approx(float(reference), rel=1e-5)
