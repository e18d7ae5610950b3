"""The `unpaired` format of stage=kto: single (prompt, completion) examples labelled desirable or not.

Records: `{prompt, completion, label}` with a boolean label (data.completion_field, data.label_field;
the prompt as every prompt/response format renders it); as conversations (TRL's conversational unpaired
format: prompt and completion message lists) through the tokenizer's chat template (`ChatEncoder.completion`:
the prompt with its generation prompt, the completion through its end-of-turn token). Preference pairs
`{prompt, chosen, rejected}` (text or conversations) are unpaired as TRL does: chosen -> label true, rejected
-> label false (the built-in data is made that way from the built-in pairs: `builtin.unpaired_examples`).

A batch of B examples is one (2B, T) tensor: rows [0, B) are the examples, rows [B, 2B) the
mismatched pairs KTO estimates its KL reference point on: prompt i with the completion of example
i - 1 (mod B), TRL's rotation, within the batch (llmlab shuffles examples, so a batch is the natural
set). `desirable` (B,) bool holds the labels.
"""
from __future__ import annotations

import torch

from llmlab.data.messages import assistant_only, chat_fields, messages_list, preference_conversation
from llmlab.data.rows import left_pad, pad_rows, records_list
from llmlab.data.templates import PromptRenderer
from llmlab.errors import DataError
from llmlab.losses import IGNORE_INDEX


def _label(value, field: str, index: int) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise DataError(f"data.label_field={field!r}: record {index} has label {value!r}; KTO labels are booleans "
                    f"(true: desirable completion, false: undesirable)")


def join(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> dict | None:
    """prompt + completion token lists -> input_ids and labels (prompt masked); too long: the prompt is cut
    from the left (as formats.tokenize_example); None if not one completion token fits."""
    overflow = len(prompt_ids) + len(completion_ids) - max_length
    if overflow > 0:
        if overflow >= len(prompt_ids):
            return None
        prompt_ids = prompt_ids[overflow:]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            "prompt_length": len(prompt_ids)}


class UnpairedFormat:
    def __init__(self, tokenizer, block_size: int, completion_field: str = "completion", label_field: str = "label",
                 chosen_field: str = "chosen", rejected_field: str = "rejected", **fields):
        self.tokenizer, self.block_size = tokenizer, block_size
        self.completion_field, self.label_field = completion_field, label_field
        self.chosen_field, self.rejected_field = chosen_field, rejected_field
        self.renderer = PromptRenderer(tokenizer, **{k: v for k, v in fields.items() if v is not None})

    def _unpair(self, records: list[dict]):
        """(prompt ids, completion ids, label, answer text) per example."""
        prompt_field = self.renderer.f["prompt"]
        for i, r in enumerate(records):
            if self.completion_field not in r and self.chosen_field in r and self.rejected_field in r:
                if chat_fields(r, prompt_field, self.chosen_field, self.rejected_field):
                    prompt, chosen, rejected, tools = preference_conversation(r, self.chosen_field,
                                                                              self.rejected_field, prompt_field)
                    yield self._chat(prompt, chosen, tools, True)
                    yield self._chat(prompt, rejected, tools, False)
                    continue
                chosen, rejected = str(r[self.chosen_field]), str(r[self.rejected_field])
                if prompt_field in r:
                    prompt = self.renderer.prompt(r)
                else:  # whole conversations (hh-rlhf): the common prefix is the prompt, as PreferenceFormat
                    n = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                             min(len(chosen), len(rejected)))
                    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
                yield self._text(prompt, chosen, True, r)
                yield self._text(prompt, rejected, False, r)
                continue
            if self.completion_field not in r:
                raise DataError(f"KTO data needs data.completion_field={self.completion_field!r} and "
                                f"data.label_field={self.label_field!r} in every record, or preference pairs "
                                f"({self.chosen_field}/{self.rejected_field}); record {i} has fields {sorted(r)}")
            if r.get(self.label_field) is None:
                raise DataError(f"KTO data without labels: record {i} has no data.label_field={self.label_field!r} "
                                f"(fields: {sorted(r)}); give each example a boolean label (true: desirable), "
                                f"or set data.label_field to the column that holds it")
            label = _label(r[self.label_field], self.label_field, i)
            if chat_fields(r, prompt_field, self.completion_field):
                prompt, tools = self.renderer.conversation_prompt(r)
                field = f"data.completion_field={self.completion_field!r}"
                completion = assistant_only(messages_list(r[self.completion_field], field, what="completion"), field)
                yield self._chat(prompt, completion, tools, label)
            else:
                yield self._text(self.renderer.prompt(r), str(r[self.completion_field]), label, r)

    def _chat(self, prompt: list[dict], completion: list[dict], tools, label: bool):
        prompt_ids, completion_ids = self.renderer.chat_encoder(self.block_size, "KTO").completion(prompt, completion,
                                                                                                  tools)
        return prompt_ids, completion_ids, label, completion[-1]["content"]

    def _text(self, prompt: str, completion: str, label: bool, record: dict):
        # a prompt the chat template rendered carries its own BOS
        specials = not self.renderer.templated(record)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=specials)["input_ids"] if prompt else []
        completion_ids = (self.tokenizer(completion, add_special_tokens=False)["input_ids"]
                          + [self.tokenizer.eos_token_id])  # EOS is a target, as everywhere
        return prompt_ids, completion_ids, label, completion

    def build(self, records, split: str):
        examples = []
        for prompt_ids, completion_ids, label, answer in self._unpair(records_list(records)):
            ex = join(prompt_ids, completion_ids, self.block_size)
            if ex is not None:
                ex.update(prompt_ids=prompt_ids, completion_ids=completion_ids, desirable=label, answer=answer)
                examples.append(ex)
        if not examples:
            raise DataError(f"the {split} split has no usable KTO example")
        return examples

    def collate(self, examples: list[dict]) -> dict:
        B = len(examples)
        mismatched = [join(examples[i]["prompt_ids"], examples[(i - 1) % B]["completion_ids"], self.block_size)
                      or examples[i] for i in range(B)]  # prompt i + completion i-1 (too long: the example)
        rows = [{k: e[k] for k in ("input_ids", "labels")} for e in examples + mismatched]
        batch = pad_rows(rows, self.tokenizer.pad_token_id)  # (2B, T)
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)  # (B,)
        prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
        batch["prompt_ids"], batch["prompt_mask"] = left_pad(prompts, self.tokenizer.pad_token_id)
        batch["answers"] = [e["answer"] for e in examples]  # exact match is scored on the desirable rows only
        return batch


def unpaired_targets(batch: dict) -> dict[str, int]:
    """A (2B, T) KTO batch: B examples (the loss averages over examples; rows [B, 2B) are the KL pairs)."""
    return {"examples": int(batch["desirable"].shape[0])}
