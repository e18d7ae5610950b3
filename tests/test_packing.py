"""Packing's documented boundary behaviour (llmlab/data/packing.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmlab.data.packing import block_causal_mask, pack
from llmlab.stages.common import forward_logits

EOS = 99


def test_blocks_are_full_concatenation_with_eos_after_each_document():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    blocks = list(pack(docs, block_size=4, eos_id=EOS))
    stream = [1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8, 9, 10, 11, EOS]
    assert all(b["input_ids"].shape == (4,) for b in blocks)  # no padding anywhere
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == stream[:12]  # tail < block dropped
    # positions restart at every document start; a document cut by a block restarts at 0 too
    assert [b["position_ids"].tolist() for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert [b["segment_ids"].tolist() for b in blocks] == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_mask_is_causal_within_and_blocked_across_documents():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]), torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 1]]  # padding only sees itself (no NaN rows)


ARCHS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64),
    "opt": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=100,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=100, max_position_embeddings=64),
    # a mixture-of-experts family (router + experts; attention as Mistral's)
    "mixtral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, vocab_size=100, max_position_embeddings=64, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None),
}
# model.attn_implementation -> the packed path it takes on the CPU (llmlab.models.attention's table): sdpa becomes
# per-document SDPA calls on long rows (a boolean mask on short ones); eager gets an additive float mask;
# flex_attention a BlockMask (forward only on CPU: torch 2.13 has no CPU backward for it)
ATTN = ("sdpa", "eager", "flex_attention")
SLOW = pytest.mark.slow


def _cases():
    """(arch, compiled, attn, rows), the fast tier's share: every arch x sdpa (short and long rows) and eager; flex
    attention on Llama (the others in the slow tier: flex compiles its kernel per shape, 5-18 s each here); the
    dense float mask and the BlockMask on long rows (the code paths of short ones) and compiled models, slow."""
    for arch in sorted(ARCHS):
        for attn in ATTN:
            for rows in ("short", "long"):
                slow = (rows == "long" and attn != "sdpa") or (attn == "flex_attention" and arch != "llama")
                yield pytest.param(arch, False, attn, rows, marks=[SLOW] if slow else [],
                                   id=f"{arch}-{attn}-{rows}")
        yield pytest.param(arch, True, "sdpa", "short", marks=[SLOW], id=f"{arch}-sdpa-short-compiled")


@pytest.mark.parametrize("arch,compiled,attn,rows", list(_cases()))
def test_document_logits_do_not_depend_on_block_neighbours(arch, compiled, attn, rows):
    """compiled: the packed forward through `compile=true`'s compiled model (models.compile_forward; one
    inductor graph per architecture: 6-19 s cold on this CPU, 1-4 s from inductor's disk cache; sdpa then keeps
    its boolean (B, 1, T, T) mask) against the eager model's document alone. rows: short (14 tokens: sdpa keeps
    the boolean mask) or long (1,034 tokens, 36 documents, >= DOCUMENT_MIN_TOKENS: sdpa runs per document)."""
    import copy

    from llmlab.models.attention import DOCUMENT_SDPA, attn_implementation
    from llmlab.models.build import compile_forward

    config = AutoConfig.for_model(arch, **ARCHS[arch])
    if attn == "flex_attention" and not AutoModelForCausalLM._model_mapping[type(config)]._supports_flex_attn:
        pytest.skip(f"transformers has no flex attention for {arch}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    packed_model = model
    if compiled:
        packed_model = copy.deepcopy(model)
        compile_forward(packed_model)
    a, b = torch.randint(0, 90, (7,)).tolist(), torch.randint(0, 90, (5,)).tolist()
    # long rows: 34 documents of 29 tokens (+ EOS) before b and a; each document < the 64 positions of the model
    before = [torch.randint(0, 90, (29,)).tolist() for _ in range(34 if rows == "long" else 0)]
    start = 30 * len(before) + len(b) + 1  # where a begins in the row
    block = next(pack([*before, b, a], block_size=start + len(a) + 1, eos_id=EOS))
    batch = {k: v[None] for k, v in block.items()}
    with torch.no_grad():
        packed = forward_logits(packed_model, batch, packing="document")[0, start:]  # a's tokens + its EOS
        alone = model(torch.tensor([a + [EOS]])).logits[0]
        crossed = forward_logits(model, batch, packing="concat")[0, start:] if rows == "short" else None
    assert torch.allclose(packed, alone, atol=1e-5)
    if crossed is not None:  # concat mode does attend across documents (long rows: beyond the model's positions)
        assert not torch.allclose(crossed, alone, atol=1e-3)
    # the path taken: sdpa on the CPU runs per document (not when compiled: a graph per document count)
    expected = {"sdpa": "sdpa" if compiled else DOCUMENT_SDPA}.get(attn, attn)
    assert attn_implementation(packed_model) == expected
