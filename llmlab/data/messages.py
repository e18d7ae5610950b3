"""Conversation records as message lists, validated: what a chat record, a conversational prompt or a
conversational preference / KTO record holds (TRL's conversational formats), before any tokenizer is involved.
No torch here: `python -m llmlab.generate` checks a prompts file's conversations before torch loads."""
from __future__ import annotations

import json

from llmlab.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}
PROMPT_ENDS = ("user", "tool")  # what a generation prompt follows (TRL's rule)


def messages_list(messages, field: str, sharegpt: bool = False, last: tuple[str, ...] | None = ("assistant",),
                  what: str = "conversation") -> list[dict]:
    """A list of {role, content} messages, validated (ShareGPT {from, value} converted); `last`: the roles the
    final message may have (None: any)."""
    keys = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(messages, (list, tuple)) or not messages or \
            not all(isinstance(m, dict) and keys[0] in m for m in messages):
        raise DataError(f"{field}: a {what} must be a non-empty list of {{{keys[0]}, {keys[1]}}} messages "
                        f"(got {str(messages)[:80]!r})")
    out = []
    for m in messages:
        m = dict(m)
        if sharegpt:
            speaker = m.pop("from")
            role = SHAREGPT_ROLES.get(str(speaker))
            if role is None:
                raise DataError(f"{field}: unknown 'from' {speaker!r}: use one of {sorted(SHAREGPT_ROLES)}")
            m = {"role": role, "content": m.pop("value", ""), **m}
        if m["role"] not in ROLES:
            raise DataError(f"{field}: unknown role {m['role']!r}: use one of {', '.join(ROLES)}")
        if m.get("content") is None and not m.get("tool_calls"):
            raise DataError(f"{field}: a {m['role']} message has no content: give each message a 'content' string")
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if last is not None and out[-1]["role"] not in last:
        ends = " or ".join(last)
        ends = f"an {ends} message (the response to learn)" if last == ("assistant",) else \
            f"a {ends} message (what the answer follows)"
        raise DataError(f"{field}: each {what} must end with {ends}; "
                        f"this one ends with {out[-1]['role']!r}")
    return out


def record_tools(record: dict) -> list | None:
    tools = record.get("tools") or None
    if isinstance(tools, str):  # datasets often store tool schemas as a JSON string
        return json.loads(tools)
    return tools


def conversation(record: dict, messages_field: str = "messages") -> tuple[list[dict], list | None]:
    """(messages, tools) of a record, validated; ShareGPT `conversations` records converted."""
    if messages_field in record:
        messages, field, sharegpt = record[messages_field], f"data.messages_field={messages_field!r}", False
    elif "conversations" in record:
        messages, field, sharegpt = record["conversations"], "'conversations' (ShareGPT)", True
    else:
        raise DataError(f"a chat record needs data.messages_field={messages_field!r} (or ShareGPT 'conversations'); "
                        f"fields: {sorted(record)}")
    return messages_list(messages, field, sharegpt), record_tools(record)


def is_conversation(value) -> bool:
    """A message list (TRL's conversational records: prompt/chosen/rejected/completion as lists of messages)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def chat_fields(record: dict, *fields: str) -> bool:
    """Whether a record's prompt/completion fields are conversations; all of them or none (one-line error)."""
    present = [f for f in fields if record.get(f) is not None]  # datasets fills a column a record lacks with None
    kinds = [is_conversation(record[f]) for f in present]
    if any(kinds) and not all(kinds):
        lists = [f for f, k in zip(present, kinds) if k]
        raise DataError(f"fields {lists} are message lists but {[f for f in present if f not in lists]} are not: give "
                        f"the prompt and completions all as message lists (conversational) or all as text")
    return any(kinds)


def preference_conversation(record: dict, chosen_field: str, rejected_field: str, prompt_field: str = "prompt"):
    """(prompt messages, chosen messages, rejected messages, tools) of TRL's conversational preference records:
    explicit prompt `{prompt: [...], chosen: [assistant...], rejected: [...]}` or implicit
    `{chosen: [whole conversation], rejected: [whole conversation]}`, whose longest common message prefix is
    the prompt (TRL's `extract_prompt`). The prompt ends with a user or tool message (what the generation
    prompt follows); each completion is assistant messages only."""
    chosen = messages_list(record[chosen_field], f"data.chosen_field={chosen_field!r}")
    rejected = messages_list(record[rejected_field], f"data.rejected_field={rejected_field!r}")
    if record.get(prompt_field) is not None:
        prompt = messages_list(record[prompt_field], f"data.prompt_field={prompt_field!r}", last=PROMPT_ENDS,
                               what="prompt")
    else:
        n = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        if n == 0 or n == min(len(chosen), len(rejected)):
            raise DataError(f"data.chosen_field={chosen_field!r} / data.rejected_field={rejected_field!r}: without a "
                            f"prompt field, chosen and rejected must be whole conversations sharing their first "
                            f"messages (the prompt) and differing after them; these share {n} of "
                            f"{len(chosen)}/{len(rejected)} messages: give data.prompt_field the prompt messages")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        messages_list(prompt, f"data.chosen_field={chosen_field!r} (its shared prefix, the prompt)",
                      last=PROMPT_ENDS, what="prompt")
    assistant_only(chosen, f"data.chosen_field={chosen_field!r}")
    assistant_only(rejected, f"data.rejected_field={rejected_field!r}")
    return prompt, chosen, rejected, record_tools(record)


def assistant_only(completion: list[dict], field: str) -> list[dict]:
    """A completion (what follows the prompt) is the assistant's messages only."""
    if any(m["role"] != "assistant" for m in completion):
        raise DataError(f"{field}: after the prompt a completion must be assistant messages only (got roles "
                        f"{[m['role'] for m in completion]}); put the conversation before it in the prompt")
    return completion
