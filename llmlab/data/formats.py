"""Stage formats: records -> tokenized training examples, plus the collator for a batch.

A format is a small class chosen by the stage (`stage.data_format`), registered in FORMATS:
`build(records, split) -> dataset` (a list or an IterableDataset) and `collate(list) -> batch`.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset

from llmlab.data.chat import ChatEncoder
from llmlab.data.messages import chat_fields, preference_conversation
from llmlab.data.packing import pack
from llmlab.data.rows import (
    left_pad,
    pack_examples,
    pad_rows,
    records_list,
    tokenize_example,
)
from llmlab.data.templates import PromptRenderer
from llmlab.data.unpaired import UnpairedFormat, join, unpaired_targets
from llmlab.errors import DataError
from llmlab.losses import IGNORE_INDEX


def _texts(records: Iterable[dict], field: str) -> Iterator[str]:
    for i, r in enumerate(records):
        if field not in r:
            raise DataError(f"data.text_field={field!r} is not in the records (fields: {sorted(r)}); "
                            f"set data.text_field to one of them")
        yield r[field]


class _PackedStream(IterableDataset):
    """Streaming corpora: tokenize and pack on the fly, each rank and each DataLoader worker only its own records.

    With A DataLoader workers (A = 1 without workers), rank r's worker w reads part r * A + v of world_size * A
    (`datasets.distributed.split_dataset_by_node`: whole files when their number divides, else every
    (world_size * A)-th record), so each process tokenizes only its share of the stream. The DataLoader takes
    batches from workers 0, 1, ... in turn; batch k of a rank comes from part k % A. `skip` (blocks this rank
    consumed before a resume) is turned into each part's own count and worker w plays part v = (w + done) % A,
    so the resumed loader's first batch is the next one of the uninterrupted run.
    """

    def __init__(self, records, fmt: "LMFormat"):
        self.records, self.fmt = records, fmt
        self.rank, self.world_size, self.skip, self.batch_size = 0, 1, 0, 1

    def _share(self, part: int = 0, parts: int = 1):
        records, n = self.records, self.world_size * parts
        if n > 1 and hasattr(records, "n_shards"):  # a datasets IterableDataset
            from datasets.distributed import split_dataset_by_node

            return split_dataset_by_node(records, rank=self.rank * parts + part, world_size=n), True
        return records, False

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        done = self.skip // self.batch_size  # batches this rank consumed
        part = (worker + done) % workers
        records, split = self._share(part, workers)
        skip = (max(done - part, 0) + workers - 1) // workers * self.batch_size  # of part's own blocks
        blocks = self.fmt._blocks(_unsplit(records) if info is not None else records)
        for i, block in enumerate(blocks):
            if split or self.world_size == 1:
                if i >= skip:
                    yield block
            elif i % self.world_size == self.rank and i // self.world_size >= skip:
                yield block


def _unsplit(records):
    """Iterate a `datasets` IterableDataset inside a DataLoader worker without its own split among workers
    (`_PackedStream` already gave this worker its part: a second split would leave it 1/A of that). `datasets`
    decides at the first `next()` by `torch.utils.data.get_worker_info()`; it is hidden for that call only."""
    from torch.utils.data._utils import worker as torch_worker

    it = iter(records)
    saved, torch_worker._worker_info = torch_worker._worker_info, None
    try:
        first = next(it, _END)
    finally:
        torch_worker._worker_info = saved
    if first is not _END:
        yield first
        yield from it


_END = object()


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


# --------------------------------------------------------------------------------------------------
# Prompt/response formats (SFT, reward modeling, DPO, PPO)
# --------------------------------------------------------------------------------------------------
class SFTFormat:
    """Instruction tuning: prompt masked, response + EOS learned; optional packing of examples.

    Validation batches also carry left-padded prompts and the reference answers, so the stage can
    score greedy generations by exact match.
    """

    def __init__(self, tokenizer, block_size: int, pack_examples: bool = False, train_on: str = "all_assistant",
                 **fields):
        self.tokenizer, self.block_size, self.pack = tokenizer, block_size, pack_examples
        self.renderer = PromptRenderer(tokenizer, **{k: v for k, v in fields.items() if v is not None})
        self.chat = None  # conversations through the tokenizer's own chat template (llmlab/data/chat.py)
        if getattr(tokenizer, "chat_template", None):
            self.chat = ChatEncoder(tokenizer, block_size, train_on or "all_assistant",
                                    fields.get("messages_field") or "messages")

    def build(self, records, split: str):
        examples = []
        for r in records_list(records):
            if self.chat is not None and self.renderer.detect(r) == "chat":
                examples += self.chat.examples(r)
                continue
            prompt, response = self.renderer.prompt(r), self.renderer.response(r)
            ex = tokenize_example(self.tokenizer, prompt, response, self.block_size)
            if ex is not None:
                ex["answer"] = response
                examples.append(ex)
        if not examples:
            raise DataError(f"the {split} split has no usable example (empty, or every example is longer "
                            f"than data.block_size={self.block_size})")
        if self.pack and split == "train":
            return pack_examples(examples, self.block_size)
        return examples

    def collate(self, examples: list[dict]) -> dict:
        batch = pad_rows(examples, self.tokenizer.pad_token_id)
        if all("prompt_length" in e for e in examples):
            prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
            batch["prompt_ids"], batch["prompt_mask"] = left_pad(prompts, self.tokenizer.pad_token_id)
            batch["answers"] = [e["answer"] for e in examples]
        return batch


class PreferenceFormat:
    """Preference pairs for reward modeling and DPO.

    A batch of B pairs is one (2B, T) tensor: rows [0, B) are the chosen answers, rows [B, 2B) the
    rejected ones, so a single forward scores both. Records without a prompt field (e.g. hh-rlhf,
    whose chosen/rejected are whole conversations) use their longest common prefix as the prompt.
    Conversational records (chosen/rejected as message lists, TRL's formats) go through the tokenizer's chat
    template (`chat.preference_conversation`, `ChatEncoder.completion`).
    """

    def __init__(self, tokenizer, block_size: int, chosen_field: str = "chosen",
                 rejected_field: str = "rejected", **fields):
        self.tokenizer, self.block_size = tokenizer, block_size
        self.chosen_field, self.rejected_field = chosen_field, rejected_field
        self.renderer = PromptRenderer(tokenizer, **{k: v for k, v in fields.items() if v is not None})

    def _split_prompt(self, r: dict) -> tuple[str, str, str]:
        chosen, rejected = str(r[self.chosen_field]), str(r[self.rejected_field])
        if self.renderer.f["prompt"] in r:
            return self.renderer.prompt(r), chosen, rejected
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]

    def pair(self, r: dict) -> dict | None:
        """{chosen, rejected: token rows, answer} of one record (None: nothing of a completion fits)."""
        for key, field in (("chosen", self.chosen_field), ("rejected", self.rejected_field)):
            if field not in r:
                raise DataError(f"preference data needs data.{key}_field={field!r} in every record (fields: "
                                f"{sorted(r)}); set data.chosen_field / data.rejected_field")
        if chat_fields(r, self.renderer.f["prompt"], self.chosen_field, self.rejected_field):
            prompt, chosen, rejected, tools = preference_conversation(r, self.chosen_field, self.rejected_field,
                                                                      self.renderer.f["prompt"])
            encoder = self.renderer.chat_encoder(self.block_size, "preference")
            prompt_ids, chosen_ids = encoder.completion(prompt, chosen, tools)
            _, rejected_ids = encoder.completion(prompt, rejected, tools)
            c, j = join(prompt_ids, chosen_ids, self.block_size), join(prompt_ids, rejected_ids, self.block_size)
            answer = chosen[-1]["content"]
        else:
            prompt, answer, rejected_text = self._split_prompt(r)
            # a prompt the chat template rendered carries its own BOS
            specials = not (self.renderer.f["prompt"] in r and self.renderer.templated(r))
            c = tokenize_example(self.tokenizer, prompt, answer, self.block_size, specials)
            j = tokenize_example(self.tokenizer, prompt, rejected_text, self.block_size, specials)
        if c is None or j is None:
            return None
        return {"chosen": c, "rejected": j, "answer": answer}

    def build(self, records, split: str):
        pairs = [p for p in map(self.pair, records_list(records)) if p is not None]
        if not pairs:
            raise DataError(f"the {split} split has no usable preference pair")
        return pairs

    def collate(self, pairs: list[dict]) -> dict:
        batch = pad_rows([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], self.tokenizer.pad_token_id)
        prompts = [p["chosen"]["input_ids"][: p["chosen"]["prompt_length"]] for p in pairs]
        batch["prompt_ids"], batch["prompt_mask"] = left_pad(prompts, self.tokenizer.pad_token_id)
        batch["answers"] = [p["answer"] for p in pairs]
        return batch


class PromptFormat:
    """PPO prompts: left-padded prompt ids for generation, plus reference answers when the data has
    them (`data.answer_field`, used by rule rewards)."""

    def __init__(self, tokenizer, block_size: int, answer_field: str = "answer", **fields):
        self.tokenizer, self.block_size, self.answer_field = tokenizer, block_size, answer_field
        self.renderer = PromptRenderer(tokenizer, **{k: v for k, v in fields.items() if v is not None})

    def build(self, records, split: str):
        out = []
        for r in records_list(records):
            text = self.renderer.prompt(r)
            # a chat-template prompt carries its own BOS: adding the tokenizer's would double it (Llama 3, Gemma)
            ids = self.tokenizer(text, add_special_tokens=not self.renderer.templated(r))["input_ids"][-self.block_size:]
            out.append({"prompt": text, "prompt_ids": ids, "answer": r.get(self.answer_field)})
        if not out:
            raise DataError(f"the {split} split has no prompt")
        return out

    def collate(self, rows: list[dict]) -> dict:
        ids, mask = left_pad([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id)
        return {"prompt_ids": ids, "prompt_mask": mask, "prompts": [r["prompt"] for r in rows],
                "answers": [r["answer"] for r in rows]}


FORMATS.update({"sft": SFTFormat, "preference": PreferenceFormat, "prompt": PromptFormat, "unpaired": UnpairedFormat})


# --------------------------------------------------------------------------------------------------
# Loss targets per batch: what one optimizer step's losses are averaged over (see datamodule.StepTargets)
# --------------------------------------------------------------------------------------------------
def lm_targets(batch: dict) -> dict[str, int]:
    """Next-token targets of a causal-LM batch (lm, sft): labels[:, 1:] that are not IGNORE_INDEX.

    The same count `losses.causal_lm_loss_sum` returns, so a loss sum over the step divided by the
    step's total is the token-weighted mean of one big batch."""
    return {"tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}


def preference_targets(batch: dict) -> dict[str, int]:
    """A (2B, T) preference batch: B pairs (the DPO term averages over pairs) and the target tokens of
    the chosen rows [0, B) (the NLL term averages over those tokens)."""
    B = batch["input_ids"].shape[0] // 2
    return {"pairs": B, "tokens": int((batch["labels"][:B, 1:] != IGNORE_INDEX).sum())}


# data format -> counting function; formats without one (prompt: PPO builds its own batches) get no counts
TARGET_COUNTS = {"lm": lm_targets, "sft": lm_targets, "preference": preference_targets, "unpaired": unpaired_targets}

