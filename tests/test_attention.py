"""model.attn_implementation and packed rows without a dense mask (llmlab/models/attention.py): the per-document
CPU path equals SDPA with the block-diagonal mask (outputs and gradients), each implementation gets the boundary
form it takes (the CUDA paths by their selection, here on CPU tensors), the rules before weights load."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import BlockMask

from llmlab.checks.model import check_attention_device, check_model
from llmlab.data.packing import block_causal_mask
from llmlab.errors import ConfigError
from llmlab.models import attention
from llmlab.models.attention import (
    DOCUMENT_MIN_TOKENS,
    DOCUMENT_SDPA,
    document_lengths,
    document_sdpa_forward,
    packed_attention_kwargs,
    varlen_kwargs,
)
from llmlab.models.build import build_model


def test_document_lengths_are_flash_attentions_cu_seqlens_over_rows_end_to_end():
    # row 0: documents of 2 and 3 tokens; row 1: 3 tokens then 2 of padding (-1); a row's end ends a run
    seg = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, -1, -1]])
    assert document_lengths(seg).tolist() == [0, 2, 5, 8, 10]
    assert document_lengths(seg).dtype == torch.int32  # what flash_attn_varlen_func takes
    kw = varlen_kwargs(seg)
    assert kw["max_length_q"] == kw["max_length_k"] == 3 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    # the same document id in two rows is two documents
    assert document_lengths(torch.tensor([[0, 0], [0, 0]])).tolist() == [0, 2, 4]


class _Attn(torch.nn.Module):  # what transformers' attention functions read from the calling module
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_per_document_sdpa_equals_sdpa_with_the_block_mask_outputs_and_gradients(kv_heads):
    """Real rows (padding excluded): the same attention output and the same gradients for q, k, v."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 12, 8
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 3 + [-1] * 2])
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, kv_heads, T, D, requires_grad=True)
    v = torch.randn(B, kv_heads, T, D, requires_grad=True)
    module = _Attn(H // kv_heads).train()
    real = (seg >= 0)[:, :, None, None]  # (B, T, 1, 1)

    def run(**kw):
        out, _ = document_sdpa_forward(module, q, k, v, dropout=0.0, scaling=D ** -0.5, **kw)  # (B, T, H, D)
        grads = torch.autograd.grad((out * real).square().sum(), (q, k, v))
        return out * real, grads

    ref, ref_grads = run(attention_mask=block_causal_mask(seg, torch.bool))  # sdpa, boolean (B, 1, T, T) mask
    got, got_grads = run(attention_mask=None, **varlen_kwargs(seg))
    assert ref.shape == (B, T, H, D)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)  # rounding: a lone first token's q-grad is 0 +- 2e-6


def _llama(attn: str = "sdpa"):
    config = AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, vocab_size=100,
                                  max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def _rows(T: int):
    seg = (torch.arange(T) // 50)[None]  # (1, T): documents of 50 tokens
    return seg, torch.arange(T)[None] % 50


def test_each_implementation_gets_the_boundary_form_it_takes():
    """The selection, for every implementation (the CUDA ones' kwargs built on CPU tensors; nothing runs them)."""
    long, short = _rows(DOCUMENT_MIN_TOKENS), _rows(64)
    float_mask = lambda: torch.float32
    # FlashAttention 2/3: cumulative lengths, no mask at all, at any length
    model = _llama()
    for impl in ("flash_attention_2", "flash_attention_3"):
        model.config._attn_implementation = impl
        kw = packed_attention_kwargs(model, *short, float_mask)
        assert "attention_mask" not in kw and kw["cu_seq_lens_q"].tolist() == [0, 50, 64]
        assert kw["position_ids"] is short[1]
    # flex attention: a BlockMask (block indices, not a T x T tensor)
    model.config._attn_implementation = "flex_attention"
    assert isinstance(packed_attention_kwargs(model, *short, float_mask)["attention_mask"], BlockMask)
    # eager: an additive float mask (B, 1, T, T)
    model.config._attn_implementation = "eager"
    mask = packed_attention_kwargs(model, *short, float_mask)["attention_mask"]
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 64, 64)
    # sdpa on the CPU: switched to per-document SDPA for good; short rows keep the boolean mask, long ones none
    model = _llama("sdpa")
    mask = packed_attention_kwargs(model, *short, float_mask)["attention_mask"]
    assert model.config._attn_implementation == DOCUMENT_SDPA and mask.dtype == torch.bool
    kw = packed_attention_kwargs(model, *long, float_mask)
    assert "attention_mask" not in kw and len(kw["cu_seq_lens_q"]) == DOCUMENT_MIN_TOKENS // 50 + 2
    # compiled (compile=true): sdpa stays sdpa with its boolean mask (a graph per document count otherwise)
    model = _llama("sdpa")
    model.compile()
    kw = packed_attention_kwargs(model, *long, float_mask)
    assert model.config._attn_implementation == "sdpa" and kw["attention_mask"].dtype == torch.bool


def test_per_document_model_forward_equals_the_boolean_mask_forward_and_saves_plain_sdpa(tmp_path):
    """A whole model (Llama, GQA) on a long packed row: the same logits both ways; its saved config does not name
    llmlab's implementation (another program loads it with transformers' default)."""
    torch.manual_seed(0)
    model = _llama().eval()
    seg, pos = _rows(DOCUMENT_MIN_TOKENS)
    ids = torch.randint(0, 100, seg.shape)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(seg, torch.bool)).logits
        kw = packed_attention_kwargs(model, seg, pos, lambda: torch.float32)
        got = model(input_ids=ids, use_cache=False, **kw).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    assert DOCUMENT_SDPA not in (tmp_path / "config.json").read_text()
    # generation under DOCUMENT_SDPA is transformers' sdpa (no cumulative lengths passed)
    out = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(out, model.generate(ids[:, :5], max_new_tokens=3, do_sample=False))


def test_per_document_training_gradients_equal_the_masked_ones_with_gradient_checkpointing():
    """Training mode, gradient checkpointing on (attention re-runs in backward): the parameter gradients of a packed
    long row through per-document SDPA equal those through sdpa with the boolean mask."""
    from llmlab.stages.common import forward_logits

    torch.manual_seed(0)
    seg, pos = _rows(DOCUMENT_MIN_TOKENS)
    ids = torch.randint(0, 100, seg.shape)
    grads = []
    for per_document in (True, False):
        torch.manual_seed(0)
        model = _llama()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if per_document:  # llmlab's packed forward: switches sdpa to DOCUMENT_SDPA, passes cumulative lengths
            logits = forward_logits(model, {"input_ids": ids, "segment_ids": seg, "position_ids": pos})
            assert model.config._attn_implementation == DOCUMENT_SDPA
        else:
            logits = model(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(seg, torch.bool),
                           use_cache=False).logits
        logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_flex_attention_backward_does_not_run_on_this_cpu():
    """Why flex_attention is refused for CPU training (check_attention_device): torch 2.13 has no CPU backward.
    When this test fails, torch has one: drop the rule."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 128, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q).sum().backward()


def _cfg(attn, accelerator="cpu", **top):
    return OmegaConf.create({"model": {"name": "tiny", "init": "scratch", "config": {"model_type": "gpt2"},
                                       "tokenizer": "builtin", "attn_implementation": attn},
                             "trainer": {"accelerator": accelerator}, **top})


def test_attn_implementation_rules():
    for attn in (None, *attention.ATTN_IMPLEMENTATIONS):
        check_model(_cfg(attn))
    with pytest.raises(ConfigError, match="model.attn_implementation='flash_attn'.*flash_attention_2"):
        check_model(_cfg("flash_attn"))
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        check_attention_device(_cfg("flash_attention_2"))
    with pytest.raises(ConfigError, match="flash_attn package"):
        check_attention_device(_cfg("flash_attention_2", "gpu"), cuda_available=True, flash_attn_installed=False)
    check_attention_device(_cfg("flash_attention_2", "gpu"), cuda_available=True, flash_attn_installed=True)
    with pytest.raises(ConfigError, match="cannot train on the CPU"):
        check_attention_device(_cfg("flex_attention", "auto"), cuda_available=False)
    check_attention_device(_cfg("flex_attention", "auto", dry_run=True), cuda_available=False)
    check_attention_device(_cfg("flex_attention", "auto"), cuda_available=True)
    for attn in (None, "sdpa", "eager"):
        check_attention_device(_cfg(attn))


def test_attn_implementation_reaches_the_model_and_a_missing_one_is_one_line():
    cfg = OmegaConf.create({"init": "scratch", "attn_implementation": "eager", "config": {
        "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100}})
    assert build_model(cfg).config._attn_implementation == "eager"
    cfg.attn_implementation = None  # transformers' default
    assert build_model(cfg).config._attn_implementation == "sdpa"
    cfg.attn_implementation, cfg.config = "flex_attention", {"model_type": "gpt2", "n_layer": 1, "n_embd": 32,
                                                             "n_head": 2, "vocab_size": 100}
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flex_attention: GPT2LMHeadModel does not "
                                          r"support .*; use model.attn_implementation=sdpa") as err:
        build_model(cfg)
    assert "\n" not in str(err.value)
