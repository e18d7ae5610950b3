"""Turn a record into (prompt text, response text) for SFT, reward modeling, DPO and PPO.

Record shapes, picked by `data.record_format` (auto detects from the fields present):
- prompt_response: {prompt_field, response_field} (preference data: {prompt, chosen, rejected})
- alpaca: {instruction, input, output}; prompt = instruction + "\n\n" + input (when non-empty)
- chat: {messages: [{role, content}, ...]} (or ShareGPT {conversations: [{from, value}]}). SFT with a
  tokenizer that has a chat template trains whole conversations through it (llmlab/data/chat.py); here
  (preference/PPO prompts, or no template) the last assistant message is the response and the rest is
  rendered with the chat template (generation prompt added) when there is one, else flattened as
  "role: content" lines.
Non-chat prompts go through `data.prompt_template`, which must contain "{prompt}" (e.g. the
course's "Question: {prompt}\n\nAnswer: ").
"""
from __future__ import annotations

from llmlab.data.chat import conversation
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
        self.f = dict(prompt=prompt_field, response=response_field, instruction=instruction_field,
                      input=input_field, output=output_field, messages=messages_field)

    def detect(self, record: dict) -> str:
        if self.record_format != "auto":
            return self.record_format
        if self.f["messages"] in record or "conversations" in record:  # ShareGPT: conversations [{from, value}]
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

    def _chat(self, record: dict) -> tuple[str, str]:
        messages, tools = conversation(record, self.f["messages"])
        history, answer = messages[:-1], messages[-1]["content"]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(history, tools=tools, tokenize=False, add_generation_prompt=True)
            return text, answer
        flat = "".join(f"{m['role']}: {m['content']}\n\n" for m in history)
        return self.template.format(prompt=flat.strip()), answer
