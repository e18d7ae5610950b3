"""Tiny models of real families for the GGUF tests and benchmark, built here with nothing downloaded.

Each is a transformers model from a config (2 layers, 64 wide by default) with a real byte-level BPE
tokenizer trained in about a second with `tokenizers` on tinyshakespeare, the family's special tokens and
its real chat template (TRL ships them: Llama 3, Qwen 2.5), then trained a few dozen steps on the same text.
Why trained: on random weights the top two logits are often within rounding of each other, so f16 or q8_0
can flip a greedy choice and the comparison would test luck; a few steps of training make the model pick
its next token by a margin (the tests print the smallest margin along each compared path).
"""
from __future__ import annotations

from pathlib import Path

from tests.families import SHAKESPEARE as TEXT  # the repo's sibling shared/data/ (as CI lays it out)

FAMILIES = {
    # special tokens, chat template file in trl/chat_templates, eos, bos
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "llama3.jinja", "<|eot_id|>", "<|begin_of_text|>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "qwen2_5.jinja", "<|im_end|>", None),
    "gpt2": (["<|endoftext|>"], None, "<|endoftext|>", "<|endoftext|>"),
}


def shakespeare(n_chars: int = 300_000) -> str:
    return TEXT.read_text()[:n_chars]


def bpe_tokenizer(family: str, vocab_size: int = 512):
    """A real byte-level BPE (GPT-2's pre-tokenizer) with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, template, eos, bos = FAMILIES[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([shakespeare()], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=bos, pad_token=eos)
    if template:
        import trl

        tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / template).read_text()
    return tok


def config_for(family: str, vocab_size: int, layers: int = 2, width: int = 64, heads: int = 4, kv_heads: int = 2,
               positions: int = 512, tok=None):
    from transformers import AutoConfig

    ids = {} if tok is None else dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_layer=layers, n_embd=width, n_head=heads,
                                    n_positions=positions, **ids)
    # Llama untied (as Llama 2/3 8B), Qwen2 tied (as Qwen2.5 0.5B). The Llama's init is 5x the default: with
    # its untied head at std 0.02 the tiny model's logits stay small after a few dozen steps and its greedy
    # path has top-1 margins of ~0.002 (near-ties); at 0.1 they are 0.03-0.3 like the tied families'.
    extra = dict(initializer_range=0.1) if family == "llama" else {}
    return AutoConfig.for_model(family, vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=width,
                                intermediate_size=width * 3, num_attention_heads=heads,
                                num_key_value_heads=kv_heads, max_position_embeddings=positions,
                                tie_word_embeddings=family == "qwen2", **extra, **ids)


def train_steps(model, tok, steps: int, seq: int = 64, batch: int = 16, lr: float = 3e-3, seed: int = 0) -> float:
    """A plain AdamW loop on tinyshakespeare; returns the last loss."""
    import torch

    ids = torch.tensor(tok(shakespeare(), add_special_tokens=False).input_ids)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = None
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s: s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss)


def build(family: str, out: Path, steps: int = 60, seed: int = 0, lr: float = 3e-3, **shape) -> Path:
    """Tokenizer + model of `family`, trained `steps` steps, saved (fp32) to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, len(tok), tok=tok, **shape))
    if steps:
        train_steps(model, tok, steps, seed=seed, lr=lr)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)
