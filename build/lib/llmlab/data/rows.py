"""Token rows shared by the prompt/response formats (formats.py, unpaired.py) and the reward functions:
an example tokenized with its prompt masked, right-padded (B, T) batches, left-padded prompts for
generation, greedy packing, and the records of a non-streaming source as a list."""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from llmlab.errors import DataError
from llmlab.losses import IGNORE_INDEX


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int,
                     add_special_tokens: bool = True) -> dict | None:
    """prompt + response + EOS -> input_ids and labels with the prompt masked (IGNORE_INDEX).

    EOS is a target, so the model learns to stop. The prompt keeps the tokenizer's own special tokens
    (e.g. Llama's BOS) unless `add_special_tokens=False` (a prompt rendered by a chat template, which writes
    them itself). Too long: the prompt is cut from the left; None if no response token fits.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    overflow = len(prompt_ids) + len(response_ids) - max_length
    if overflow > 0:
        if overflow >= len(prompt_ids):
            return None
        prompt_ids = prompt_ids[overflow:]
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
            "prompt_length": len(prompt_ids)}


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    """Right-pad token rows into (B, T) tensors; padding gets segment id -1 and label IGNORE_INDEX."""
    T = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "labels": [], "segment_ids": [], "position_ids": []}
    for r in rows:
        n, pad = len(r["input_ids"]), T - len(r["input_ids"])
        out["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        out["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
        out["segment_ids"].append(r.get("segment_ids", [0] * n) + [-1] * pad)
        out["position_ids"].append(r.get("position_ids", list(range(n))) + [0] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for generation: left-padded ids (B, T) and attention mask (B, T)."""
    T = max(len(t) for t in token_lists)
    ids = torch.tensor([[pad_id] * (T - len(t)) + t for t in token_lists])
    mask = torch.tensor([[0] * (T - len(t)) + [1] * len(t) for t in token_lists])
    return ids, mask


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Greedy packing of tokenized examples into rows of at most block_size tokens.

    Each example keeps its own segment id and positions from 0; with `packing: document` the stage
    masks attention across examples, so a packed example sees exactly what it would see alone.
    """
    rows, cur = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > block_size:
            cur = {"input_ids": [], "labels": [], "segment_ids": [], "position_ids": [], "_n": 0}
            rows.append(cur)
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["segment_ids"] += [cur["_n"]] * n
        cur["position_ids"] += list(range(n))
        cur["_n"] += 1
    for r in rows:
        del r["_n"]
    return rows


def records_list(records) -> list[dict]:
    if isinstance(records, IterableDataset) or type(records).__name__ == "IterableDataset":
        raise DataError("data.streaming=true is supported for pretraining (stage=pretrain) only; "
                        "set data.streaming=false for prompt/response data")
    return [dict(r) for r in records]
