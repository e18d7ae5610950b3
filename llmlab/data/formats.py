"""Stage formats: records -> tokenized training examples, plus the collator for a batch.

A format is a small class chosen by the stage (`stage.data_format`), registered in FORMATS:
`build(records, split) -> dataset` (a list or an IterableDataset) and `collate(list) -> batch`.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset

from llmlab.data.packing import pack
from llmlab.data.sources import DataError


def _texts(records: Iterable[dict], field: str) -> Iterator[str]:
    for i, r in enumerate(records):
        if field not in r:
            raise DataError(f"data.text_field={field!r} is not in the records (fields: {sorted(r)}); "
                            f"set data.text_field to one of them")
        yield r[field]


class _PackedStream(IterableDataset):
    """Streaming corpora: tokenize and pack on the fly; each rank keeps every world_size-th block."""

    def __init__(self, records, fmt: "LMFormat"):
        self.records, self.fmt = records, fmt
        self.rank, self.world_size, self.skip = 0, 1, 0

    def __iter__(self):
        for i, block in enumerate(self.fmt._blocks(self.records)):
            if i % self.world_size == self.rank and i // self.world_size >= self.skip:
                yield block


class LMFormat:
    """Causal-LM pretraining: tokenize text on the fly and pack it into fixed blocks (see packing.py)."""

    def __init__(self, tokenizer, block_size: int, text_field: str = "text", **_):
        self.tokenizer, self.block_size, self.text_field = tokenizer, block_size, text_field

    def _blocks(self, records, batch: int = 512) -> Iterator[dict]:
        def token_lists():
            texts = []
            for text in _texts(records, self.text_field):
                texts.append(text)
                if len(texts) == batch:
                    yield from self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                    texts = []
            if texts:
                yield from self.tokenizer(texts, add_special_tokens=False)["input_ids"]

        return pack(token_lists(), self.block_size, self.tokenizer.eos_token_id)

    def build(self, records, split: str):
        if isinstance(records, IterableDataset) or type(records).__name__ == "IterableDataset":
            return _PackedStream(records, self)
        blocks = list(self._blocks(records))
        if not blocks:
            raise DataError(f"the {split} data gave no complete block of data.block_size={self.block_size} "
                            f"tokens: add text or lower data.block_size")
        return blocks

    def collate(self, examples: list[dict]) -> dict:
        batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        batch["labels"] = batch["input_ids"]  # every packed token is a target (EOS included)
        return batch


FORMATS = {"lm": LMFormat}
