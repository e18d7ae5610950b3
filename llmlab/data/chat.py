"""Conversations trained as the model will be used: the tokenizer's own chat template decides every token.

A record `{messages: [{role, content}, ...]}` (or ShareGPT's `{conversations: [{from, value}, ...]}`, or TRL's
conversational `{prompt: [...], completion: [...]}` whose completion alone is a target; optional `tools`) becomes
token rows whose
- input_ids are exactly `tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)`: the template
  writes BOS where the model expects it, nothing is added on top (encoding the rendered text with
  add_special_tokens=True doubled BOS for Llama 3 / Gemma tokenizers, whose post-processor adds it too);
- targets (labels) are, for every assistant turn (`data.train_on=all_assistant`, the default) or the last one
  (`last_assistant`), exactly what the model generates after the template's generation prompt, through its
  end-of-turn token: render messages[:i] with add_generation_prompt=True (P) and messages[:i+1] (F); F must
  start with P; the turn's targets are F's tokens after P up to and including the first special token (the
  template's end of turn: <|eot_id|>, <|im_end|>, <end_of_turn>, <|end|>; what follows it, e.g. the newline
  Qwen writes after <|im_end|>, is context the model never generates). System, user and tool messages
  (tool results) are never targets; an assistant turn's tool calls are, as the template renders them.

Templates that do not preserve prefixes. Some templates render an earlier turn differently once later turns
follow: Qwen 3 drops an earlier assistant turn's reasoning (and its empty <think></think>) once a later user
message exists; Phi-3.5 writes an extra <|end|> after the last message. The rule, checked per conversation
and per turn: a turn is trained inside the whole conversation's tokens when those tokens, up to the end of
the turn's targets, equal F's (what the model saw and generated at that turn). Otherwise the turn is trained
as the last turn of its own prefix: one more row, F with that turn's targets. So every target is trained in
exactly the context the model has when it generates it (Phi-3.5's trailing <|end|> lies after every target,
so its conversations stay one row; Qwen 3's earlier turns become rows of their own).

Preference and KTO data as conversations (TRL's conversational formats: `{prompt: [...], chosen: [...],
rejected: [...]}`, the implicit-prompt `{chosen: [whole], rejected: [whole]}`, KTO's `{prompt, completion,
label}`): `ChatEncoder.completion` gives the prompt with the generation prompt and each completion through its
end-of-turn token, the same targets as above. At use time (generate, eval, rollouts) a conversational prompt is
`render_prompt` (generation prompt added) and generation stops at `stop_ids` (generation_config's EOS list, the
tokenizer's EOS, the template's end of turn).
"""
from __future__ import annotations

from llmlab.data.messages import PROMPT_ENDS, assistant_only, conversation, is_conversation, messages_list, record_tools
from llmlab.errors import DataError
from llmlab.losses import IGNORE_INDEX

TRAIN_ON = ("all_assistant", "last_assistant")
# a message key -> the word a template that supports it contains
FEATURES = {"tool_calls": "tool_calls", "reasoning_content": "reasoning_content"}


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id generation stops at: `generation_config.eos_token_id` (an int or a list: Llama 3 Instruct
    lists <|eot_id|> and <|end_of_text|>), the tokenizer's EOS and, with a chat template, its end-of-turn token
    (what ends an assistant turn there: a base model's tokenizer EOS may be another token)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    if getattr(tokenizer, "chat_template", None):
        ids += end_of_turn_ids(tokenizer)
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The template's end-of-turn token, found as chat.py finds targets: the last token of a probe assistant
    turn (none when the template cannot render the probe)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    encoder = ChatEncoder(tokenizer, 1 << 30)
    try:
        full, _start, end = encoder.turn(probe, None, 1)
    except Exception:  # noqa: BLE001 - a template that refuses the probe (e.g. needs a system turn): none known
        return []
    return [full[end - 1]] if full[end - 1] in encoder.end_ids else []


def render_prompt(tokenizer, messages: list[dict], tools=None, tokenize: bool = False, **template_kwargs):
    """A conversation's prompt as the model sees it before its answer: the chat template with the generation
    prompt (text, or token ids: the template writes BOS itself, so nothing is added on top)."""
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=tokenize, add_generation_prompt=True,
                                        **({"return_dict": False} if tokenize else {}), **template_kwargs)
    return list(out) if tokenize else out


class ChatEncoder:
    """Token rows of conversations through the tokenizer's chat template (module docstring)."""

    def __init__(self, tokenizer, block_size: int, train_on: str = "all_assistant", messages_field: str = "messages"):
        if train_on not in TRAIN_ON:
            raise DataError(f"data.train_on={train_on!r}: use {' or '.join(TRAIN_ON)}")
        self.tokenizer, self.block_size, self.train_on, self.field = tokenizer, block_size, train_on, messages_field
        self.template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.end_ids = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}
        self.end_ids.discard(tokenizer.bos_token_id)

    def ids(self, messages: list[dict], tools, generation_prompt: bool = False) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False,
                                                 add_generation_prompt=generation_prompt)
        return list(out)

    def _check_features(self, messages: list[dict], tools) -> None:
        if tools and "tools" not in self.template:
            raise DataError("the record has 'tools' but the tokenizer's chat template does not render tools: "
                            "use a model whose template supports tools, or drop the field")
        for key, word in FEATURES.items():
            if any(m.get(key) for m in messages) and word not in self.template:
                raise DataError(f"a message has {key!r} but the tokenizer's chat template does not render it: "
                                f"use a model whose template supports it, or drop the field")
        if any(m["role"] == "tool" for m in messages) and "tool" not in self.template:
            raise DataError("the conversation has 'tool' messages but the tokenizer's chat template has no tool role")

    def turn(self, messages: list[dict], tools, i: int) -> tuple[list[int], int, int]:
        """(F, start, end): the tokens of messages[:i+1] and the span [start, end) of turn i's targets."""
        prompt = self.ids(messages[:i], tools, generation_prompt=True)
        full = self.ids(messages[: i + 1], tools)
        if full[: len(prompt)] != prompt:
            raise DataError(f"the chat template's generation prompt is not where it renders assistant turn {i} "
                            f"(rendering messages[:{i}] with add_generation_prompt=True is not a prefix of "
                            f"messages[:{i + 1}]): this template cannot mark what the model generates")
        end = next((k + 1 for k in range(len(prompt), len(full)) if full[k] in self.end_ids), len(full))
        if end == len(prompt):
            raise DataError(f"assistant turn {i} renders to no token after the generation prompt")
        return full, len(prompt), end

    def completion(self, prompt: list[dict], completion: list[dict], tools) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of a prompt conversation and its completion (assistant messages): the
        prompt rendered with the generation prompt (P), and what the model generates after P through the last
        completion turn's end-of-turn token, as `turn` defines targets. What the template writes after that token
        (Qwen's newline) is not generated, so it is not part of the completion."""
        messages = prompt + completion
        self._check_features(messages, tools)
        full, _start, end = self.turn(messages, tools, len(messages) - 1)
        P = self.ids(prompt, tools, generation_prompt=True)
        if full[: len(P)] != P:
            raise DataError("the chat template renders the prompt with its generation prompt differently from the "
                            "prompt followed by the completion: this template cannot mark what the model generates")
        return P, full[len(P): end]

    def record_messages(self, record: dict) -> tuple[list[dict], list | None, int]:
        """(messages, tools, index of the first message that may be a target) of a chat record, or of TRL's
        conversational prompt/completion record `{prompt: [messages], completion: [assistant messages]}`: the two
        joined, only the completion a target (TRL's completion_only_loss, its SFT default for these records:
        assistant turns inside the prompt are context, as a preference record's prompt is)."""
        if self.field not in record and "conversations" not in record and is_conversation(record.get("prompt")) \
                and is_conversation(record.get("completion")):
            prompt = messages_list(record["prompt"], "'prompt'", last=PROMPT_ENDS, what="prompt")
            completion = assistant_only(messages_list(record["completion"], "'completion'"), "'completion'")
            return prompt + completion, record_tools(record), len(prompt)
        messages, tools = conversation(record, self.field)
        return messages, tools, 0

    def examples(self, record: dict) -> list[dict]:
        """Rows {input_ids, labels, prompt_length, answer} of one record; prompt_length/answer: the last turn."""
        messages, tools, first = self.record_messages(record)
        self._check_features(messages, tools)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        whole = self.ids(messages, tools)
        spans, alone = [], []
        for i in turns:
            full, start, end = self.turn(messages, tools, i)
            if whole[:end] == full[:end]:
                spans.append((start, end))
            else:
                alone.append(self._row(full, [(start, end)], messages[i]["content"]))
        rows = [self._row(whole, spans, messages[-1]["content"])] if spans else []
        return [r for r in rows + alone if r is not None]

    def _row(self, ids: list[int], spans: list[tuple[int, int]], answer: str) -> dict | None:
        """A row with targets on `spans`; cut at block_size (None when no target is left)."""
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        ids, labels = ids[: self.block_size], labels[: self.block_size]
        kept = [s for s, e in spans if e <= len(ids)]
        if not kept:
            return None
        return {"input_ids": ids, "labels": labels, "prompt_length": kept[-1], "answer": str(answer)}
