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
}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow, id="compiled")])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_document_logits_do_not_depend_on_block_neighbours(arch, compiled):
    """compiled: the packed forward through `compile=true`'s compiled model (models.compile_forward; one
    inductor graph per architecture: 6-19 s cold on this CPU, 1-4 s from inductor's disk cache) against the eager
    model's document alone."""
    import copy

    from llmlab.models.build import compile_forward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **ARCHS[arch])).eval()
    packed_model = model
    if compiled:
        packed_model = copy.deepcopy(model)
        compile_forward(packed_model)
    a, b = torch.randint(0, 90, (7,)).tolist(), torch.randint(0, 90, (5,)).tolist()
    block = next(pack([b, a], block_size=len(a) + len(b) + 2, eos_id=EOS))
    batch = {k: v[None] for k, v in block.items()}
    with torch.no_grad():
        packed = forward_logits(packed_model, batch, packing="document")[0, len(b) + 1:]  # a's tokens + its EOS
        alone = model(torch.tensor([a + [EOS]])).logits[0]
        crossed = forward_logits(model, batch, packing="concat")[0, len(b) + 1:]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(crossed, alone, atol=1e-3)  # concat mode does attend across documents
