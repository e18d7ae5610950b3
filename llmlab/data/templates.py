"""Turn a record into (prompt text, response text) for SFT, reward modeling, DPO and PPO.

Record shapes, picked by `data.record_format` (auto detects from the fields present):
- prompt_response: {prompt_field, response_field} (preference data: {prompt, chosen, rejected})
- alpaca: {instruction, input, output}; prompt = instruction + "\n\n" + input (when non-empty)
- chat: {messages: [{role, content}, ...]} (or ShareGPT {conversations: [{from, value}]}). SFT with a
  tokenizer that has a chat template trains whole conversations through it (llmlab/data/chat.py); here
  (preference/PPO prompts, or no template) the last assistant message is the response and the rest is
  rendered with the chat template (generation prompt added) when there is one, else flattened as
  "role: content" lines. A prompt field holding messages (TRL's conversational prompt-only and
  prompt/completion records, `{prompt: [{role: user, ...}]}`) is a chat prompt too, and with
  `data.record_format=chat` a prompt string is rendered as one user message: grpo/ppo rollouts and preference
  prompts then see exactly what the model sees at use time (`chat.render_prompt`).
Non-chat prompts go through `data.prompt_template`, which must contain "{prompt}" (e.g. the
course's "Question: {prompt}\n\nAnswer: ").
"""
from __future__ import annotations

from llmlab.data.chat import ChatEncoder, render_prompt
from llmlab.data.messages import (
    PROMPT_ENDS,
    conversation,
    is_conversation,
    messages_list,
    record_tools,
)
from llmlab.errors import DataError

FIELD_KEYS = ("prompt_field", "response_field", "instruction_field", "input_field", "output_field",
              "messages_field", "chosen_field", "rejected_field", "answer_field")


class PromptRenderer:
    def __init__(self, tokenizer, prompt_template: str = "{prompt}", record_format: str = "auto",
                 prompt_field: str = "prompt", response_field: str = "response",
                 instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", messages_field: str = "messages", **_):
        if "{prompt}" not in prompt_template:
            raise DataError(f"data.prompt_template={prompt_template!r} has no {{prompt}} placeholder; "
                            f"e.g. data.prompt_template='Question: {{prompt}}\\n\\nAnswer: '")
        if record_format not in ("auto", "prompt_response", "alpaca", "chat"):
            raise DataError(f"data.record_format={record_format!r}: use auto, prompt_response, alpaca or chat")
        self.tokenizer, self.template, self.record_format = tokenizer, prompt_template, record_format
        self._encoder = None  # the ChatEncoder of conversational preference/KTO records, made on first use
        self.f = dict(prompt=prompt_field, response=response_field, instruction=instruction_field,
                      input=input_field, output=output_field, messages=messages_field)

    def detect(self, record: dict) -> str:
        if self.record_format != "auto":
            return self.record_format
        if self.f["messages"] in record or "conversations" in record:  # ShareGPT: conversations [{from, value}]
            return "chat"
        if is_conversation(record.get(self.f["prompt"])):  # TRL's conversational prompt
            return "chat"
        if self.f["instruction"] in record:
            return "alpaca"
        return "prompt_response"

    def prompt(self, record: dict) -> str:
        """The rendered prompt text (what the model sees before its answer)."""
        kind = self.detect(record)
        if kind == "chat":
            return self._chat(record)[0]
        if kind == "alpaca":
            text = self._get(record, "instruction")
            extra = record.get(self.f["input"]) or ""
            return self.template.format(prompt=f"{text}\n\n{extra}" if extra else text)
        return self.template.format(prompt=self._get(record, "prompt"))

    def response(self, record: dict) -> str:
        kind = self.detect(record)
        if kind == "chat":
            return self._chat(record)[1]
        return self._get(record, "output" if kind == "alpaca" else "response")

    def _get(self, record: dict, key: str) -> str:
        field = self.f[key]
        if field not in record or record[field] is None:
            raise DataError(f"data.{key}_field={field!r} is not in the records (fields: {sorted(record)}); "
                            f"set data.{key}_field to the right column")
        return str(record[field])

    def templated(self, record: dict) -> bool:
        """True when prompt(record) is rendered by the tokenizer's chat template, which writes the special
        tokens itself (BOS included): encode it with add_special_tokens=False."""
        return self.detect(record) == "chat" and bool(getattr(self.tokenizer, "chat_template", None))

    def chat_encoder(self, block_size: int, what: str) -> ChatEncoder:
        """The ChatEncoder of conversational `what` records (one-line error without a chat template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{what} records given as conversations (message lists) need a tokenizer with a chat "
                            f"template, and this model's has none: use a model that has one, or give text fields")
        if self._encoder is None or self._encoder.block_size != block_size:
            self._encoder = ChatEncoder(self.tokenizer, block_size, messages_field=self.f["messages"])
        return self._encoder

    def conversation_prompt(self, record: dict) -> tuple[list[dict], list | None]:
        """(prompt messages, tools): a conversation without its last (assistant) message, a prompt field of
        messages (ending with a user or tool message, as TRL requires), or a prompt string as one user message."""
        if self.f["messages"] in record or "conversations" in record:
            messages, tools = conversation(record, self.f["messages"])
            return messages[:-1], tools
        value = record.get(self.f["prompt"])
        if is_conversation(value):
            return messages_list(value, f"data.prompt_field={self.f['prompt']!r}", last=PROMPT_ENDS,
                                 what="prompt"), record_tools(record)
        return [{"role": "user", "content": self._get(record, "prompt")}], record_tools(record)

    def _chat(self, record: dict) -> tuple[str, str]:
        history, tools = self.conversation_prompt(record)
        if self.f["messages"] in record or "conversations" in record:
            answer = conversation(record, self.f["messages"])[0][-1]["content"]
        else:
            value = record.get(self.f["response"], "")
            answer = value[-1].get("content", "") if is_conversation(value) else str(value or "")
        if getattr(self.tokenizer, "chat_template", None):
            return render_prompt(self.tokenizer, history, tools), answer
        flat = "".join(f"{m['role']}: {m['content']}\n\n" for m in history)
        return self.template.format(prompt=flat.strip()), answer
