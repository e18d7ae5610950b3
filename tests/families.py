"""Tiny random models of the major decoder families, saved as local pretrained dirs with a real byte-level BPE
tokenizer and each family's real chat template (the ones TRL ships in trl/chat_templates/*.jinja).

`build_family(name, out)` writes one dir (2 layers, 64 wide, 2 KV heads) in well under a second once the
tokenizer is trained; `tests/conftest.py`'s session fixture `family_dirs` builds them once per session.
The tokenizer is trained on ../shared/data/tinyshakespeare.txt (relative to the repo root) when it is there,
else on a small text written here, so the tests need no download either way.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# every marker the templates below write: one token each, as in the real tokenizers
SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>", "<pad>",
           "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
NOT_SPECIAL = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# template file (trl/chat_templates), bos (None: none), eos (end of a turn), pad, BOS added by the post-processor
TEMPLATES = {
    "llama3": ("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", True),
    "qwen2_5": ("qwen2_5.jinja", None, "<|im_end|>", "<|endoftext|>", False),
    "qwen3": ("qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", False),
    "gemma3": ("gemma3.jinja", "<bos>", "<end_of_turn>", "<pad>", True),
    "phi3_5": ("phi3_5.jinja", None, "<|end|>", "<|endoftext|>", False),
}

_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
# model_type -> (config overrides, chat template family)
FAMILIES: dict[str, tuple[dict, str]] = {
    "llama": ({}, "llama3"),
    "mistral": ({"sliding_window": None}, "llama3"),
    "qwen2": ({}, "qwen2_5"),
    "qwen3": ({"head_dim": 16}, "qwen3"),
    "gemma2": ({"head_dim": 16}, "gemma3"),
    "gemma3_text": ({"head_dim": 16}, "gemma3"),
    "phi3": ({}, "phi3_5"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "llama3"),
    "qwen3_moe": ({"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "decoder_sparse_step": 1}, "qwen3"),
    "gpt_neox": ({"rotary_pct": 0.25, "use_parallel_residual": True}, "qwen2_5"),
}

_FALLBACK_TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
                  "You are all resolved rather to die than to famish? What is the answer to two plus two? ") * 40


def template_path(name: str) -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates" / TEMPLATES[name][0]


_BPE = None


def bpe_tokenizer():
    """A byte-level BPE (vocab 512) trained once per process; every marker above is a single token."""
    global _BPE
    if _BPE is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        text = SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.exists() else _FALLBACK_TEXT
        tok.train_from_iterator([text], trainer)
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
        _BPE = tok.to_str()
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_BPE)


def family_tokenizer(template: str):
    """The BPE tokenizer dressed as `template`'s family: its bos/eos/pad, its chat template, and (Llama 3,
    Gemma) BOS added by the post-processor, as the real ones do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    _file, bos, eos, pad, adds_bos = TEMPLATES[template]
    raw = bpe_tokenizer()
    if adds_bos:
        bos_id = raw.token_to_id(bos)
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    kw = {"bos_token": bos} if bos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token=pad, **kw)
    tok.chat_template = template_path(template).read_text()
    return tok


def build_family(model_type: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random `model_type` model with its family tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, template = FAMILIES[model_type]
    tok = family_tokenizer(template)
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id}
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **{**_ARCH, **overrides}, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
