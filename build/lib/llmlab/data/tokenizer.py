"""The built-in tokenizer: byte-level, no training and no download.

Every byte is one token (GPT-2's byte-to-unicode alphabet, 256 symbols) plus three special tokens.
It is a real `tokenizers` BPE with no merges, wrapped as a `PreTrainedTokenizerFast`, so it saves and
loads with `save_pretrained` / `AutoTokenizer.from_pretrained` like any hub tokenizer.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"
# A minimal chat template so chat-formatted data works with the built-in tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def builtin_tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols, stable order
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, bos_token=BOS)
    tok.add_special_tokens({"additional_special_tokens": []})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 30
    return tok
