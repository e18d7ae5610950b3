"""Conversations trained as the model will be used (llmlab/data/chat.py), against the real chat templates of
Llama 3, Qwen 2.5, Qwen 3, Gemma 3 and Phi-3.5 that TRL ships (tests/families.py dresses a BPE tokenizer as each):
the tokens are exactly apply_chat_template's, the targets exactly each assistant turn's completion through its
end-of-turn token, and the loss equals the NLL computed directly with transformers over those targets.
"""
from __future__ import annotations

import pytest
import torch

from llmlab.data.chat import ChatEncoder
from llmlab.data.formats import SFTFormat
from llmlab.errors import DataError
from llmlab.losses import IGNORE_INDEX
from tests.families import family_tokenizer

TEMPLATES = ["llama3", "qwen2_5", "qwen3", "gemma3", "phi3_5"]
END = {"llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>",
       "phi3_5": "<|end|>"}
MULTI = {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Who speaks first?"},
                      {"role": "assistant", "content": "First Citizen."},
                      {"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": "All: Speak, speak."}]}
SHORT = {"messages": [{"role": "user", "content": "hear me"}, {"role": "assistant", "content": "I hear."}]}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: family_tokenizer(name) for name in TEMPLATES}


def target_runs(row: dict, tok) -> list[str]:
    """The decoded runs of consecutive target tokens of a row."""
    runs, cur = [], []
    for i, lab in zip(row["input_ids"], row["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def expected_target(template: str, content: str) -> str:
    # Qwen 3 writes an (empty) reasoning block before the answer of the turn it generates
    return ("<think>\n\n</think>\n\n" if template == "qwen3" else "") + content + END[template]


def template_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokens_and_targets_are_the_templates(tokenizers, template):
    tok = tokenizers[template]
    rows = SFTFormat(tok, 512).build([MULTI, SHORT], "train")
    messages = MULTI["messages"]
    whole = template_ids(tok, messages)
    assert rows[0]["input_ids"] == whole  # exactly the template's tokens: nothing added
    if tok.bos_token_id is not None:  # Llama 3 / Gemma: BOS written by the template, once
        assert whole.count(tok.bos_token_id) == 1 and whole[0] == tok.bos_token_id
    runs = [target_runs(r, tok) for r in rows]
    first, second = expected_target(template, "First Citizen."), expected_target(template, "All: Speak, speak.")
    if template == "qwen3":
        # not prefix-preserving: once a later user turn follows, the template drops the first answer's <think>
        # block, so the first answer is trained as the last turn of its own prefix (a row of its own)
        assert runs == [[second], [first], [expected_target(template, "I hear.")]]
        assert rows[1]["input_ids"] == template_ids(tok, messages[:3])
    else:
        assert runs == [[first, second], [expected_target(template, "I hear.")]]
    assert rows[-1]["input_ids"] == template_ids(tok, SHORT["messages"])
    # what precedes each target is exactly the generation prompt the model is given at inference
    first_target = lambda row: next(k for k, x in enumerate(row["labels"]) if x != IGNORE_INDEX)  # noqa: E731
    assert rows[0]["input_ids"][:rows[0]["prompt_length"]] == template_ids(tok, messages[:4], add_generation_prompt=True)
    row = rows[1] if template == "qwen3" else rows[0]
    assert row["input_ids"][:first_target(row)] == template_ids(tok, messages[:2], add_generation_prompt=True)


def test_last_assistant_only(tokenizers):
    tok = tokenizers["llama3"]
    rows = SFTFormat(tok, 512, train_on="last_assistant").build([MULTI], "train")
    assert [target_runs(r, tok) for r in rows] == [[expected_target("llama3", "All: Speak, speak.")]]


def test_tools_and_tool_results(tokenizers):
    """Qwen 2.5: tool schemas reach the system prompt, the assistant's tool call is a target as rendered,
    the tool's result never is."""
    tok = tokenizers["qwen2_5"]
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Verona?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Verona"}}}]},
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "Sunny and warm."}]}
    [row] = SFTFormat(tok, 1024).build([record], "train")
    assert row["input_ids"] == template_ids(tok, record["messages"], tools=tools)
    assert "Weather of a city" in tok.decode(row["input_ids"])
    runs = target_runs(row, tok)
    assert len(runs) == 2 and "<tool_call>" in runs[0] and '"Verona"' in runs[0] and runs[0].endswith("<|im_end|>")
    assert runs[1] == "Sunny and warm.<|im_end|>" and not any("sunny, 21C" in r for r in runs)


def test_reasoning_content(tokenizers):
    tok = tokenizers["qwen3"]
    record = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}
    [row] = SFTFormat(tok, 512).build([record], "train")
    assert target_runs(row, tok) == ["<think>\ntwo and two\n</think>\n\n4<|im_end|>"]


def test_sharegpt_records_are_conversations(tokenizers):
    tok = tokenizers["gemma3"]
    sharegpt = {"conversations": [{"from": "human", "value": "hear me"}, {"from": "gpt", "value": "I hear."}]}
    assert SFTFormat(tok, 512).build([sharegpt], "train") == SFTFormat(tok, 512).build([SHORT], "train")


@pytest.mark.parametrize("record,template,needle", [
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "llama3",
     "unknown role 'narrator'"),
    ({"messages": "hello"}, "llama3", "list of {role, content}"),
    ({"messages": [{"role": "user", "content": "x"}]}, "llama3", "must end with an assistant message"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "llama3", "unknown 'from' 'bot'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], **SHORT}, "llama3", "does not render tools"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                        "reasoning_content": "r"}]}, "gemma3",
     "'reasoning_content'"),
])
def test_bad_conversations_are_one_line_errors(tokenizers, record, template, needle):
    with pytest.raises(DataError) as err:
        SFTFormat(tokenizers[template], 512).build([record], "train")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_train_on_is_checked(tokenizers):
    with pytest.raises(DataError, match="data.train_on='every'"):
        ChatEncoder(tokenizers["llama3"], 512, train_on="every")


def test_chat_prompts_get_one_bos(tokenizers):
    """Preference and PPO prompts rendered by a chat template are not given a second BOS."""
    from llmlab.data.formats import PreferenceFormat, PromptFormat

    tok = tokenizers["llama3"]
    [prompt] = PromptFormat(tok, 512).build([SHORT], "train")
    assert prompt["prompt_ids"].count(tok.bos_token_id) == 1
    [pair] = PreferenceFormat(tok, 512).build([{**SHORT, "prompt": "-", "chosen": "Yes.", "rejected": "No."}], "train")
    assert pair["chosen"]["input_ids"].count(tok.bos_token_id) == 1


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_loss_equals_direct_nll_over_the_completions(family_dir, model_type):
    """The SFT batch's loss (padded rows, document mask) equals -log p of each assistant completion's tokens
    given the template's context, computed directly with transformers on each conversation alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.losses import causal_lm_loss_sum
    from llmlab.stages.common import forward_logits
    from tests.families import FAMILIES

    path = family_dir(model_type)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    template = {"llama3": "llama3", "qwen3": "qwen3", "gemma3": "gemma3"}[FAMILIES[model_type][1]]
    fmt = SFTFormat(tok, 512)
    with torch.no_grad():
        loss_sum, n = causal_lm_loss_sum(forward_logits(model, fmt.collate(fmt.build([MULTI, SHORT], "train"))),
                                         fmt.collate(fmt.build([MULTI, SHORT], "train"))["labels"])
        nll, count = 0.0, 0
        msgs = MULTI["messages"]
        for context, answer in ((msgs[:4], msgs[4]), (msgs[:2], msgs[2]), (SHORT["messages"][:1], SHORT["messages"][1])):
            prompt = template_ids(tok, context, add_generation_prompt=True)
            target = tok(expected_target(template, answer["content"]), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            nll -= sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(target))
            count += len(target)
    assert int(n) == count
    assert float(loss_sum) / int(n) == pytest.approx(nll / count, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Preference and KTO data as conversations (TRL's conversational formats), against TRL's own rendering
# ------------------------------------------------------------------------------------------------------------
EXPLICIT = {"prompt": MULTI["messages"][:2], "chosen": [MULTI["messages"][2]],
            "rejected": [{"role": "assistant", "content": "Nobody."}]}
IMPLICIT = {"chosen": MULTI["messages"],
            "rejected": MULTI["messages"][:-1] + [{"role": "assistant", "content": "Silence."}]}
# what TRL's `apply_chat_template` keeps after the end-of-turn token in a completion (the rest of the template's
# text: Qwen/Gemma's newline, Phi-3.5's newline + trailing <|end|>); llmlab stops at the end-of-turn token
AFTER_END = {"llama3": "", "qwen2_5": "\n", "qwen3": "\n", "gemma3": "\n", "phi3_5": "\n<|end|>"}


PAIR_WANTS = [(EXPLICIT["prompt"], "First Citizen.", "Nobody."), (MULTI["messages"][:4], "All: Speak, speak.", "Silence.")]


@pytest.mark.parametrize("template", TEMPLATES)
def test_preference_conversations_are_the_templates(tokenizers, template):
    """Explicit- and implicit-prompt preference records (TRL's conversational formats): the prompt is the
    template's rendering with the generation prompt (one BOS), each completion is exactly what the model generates
    after it through the end-of-turn token (chat.py's targets), all of it a target."""
    from llmlab.data.formats import PreferenceFormat

    tok = tokenizers[template]
    pairs = PreferenceFormat(tok, 512).build([EXPLICIT, IMPLICIT], "train")
    for pair, (prompt, chosen, rejected) in zip(pairs, PAIR_WANTS):
        for key, content in (("chosen", chosen), ("rejected", rejected)):
            row = pair[key]
            n = row["prompt_length"]
            assert row["input_ids"][:n] == template_ids(tok, prompt, add_generation_prompt=True)
            assert target_runs(row, tok) == [expected_target(template, content)]
            whole = template_ids(tok, prompt + [{"role": "assistant", "content": content}])
            assert row["input_ids"] == whole[:len(row["input_ids"])]  # the template's tokens, cut after end of turn
        assert pair["answer"] == chosen
    if tok.bos_token_id is not None:
        assert pairs[0]["chosen"]["input_ids"].count(tok.bos_token_id) == 1


@pytest.mark.slow  # importing TRL takes 6-12 s here
@pytest.mark.parametrize("template", TEMPLATES)
def test_preference_conversations_equal_trl(tokenizers, template):
    """Against TRL 1.16 (`maybe_extract_prompt` + `maybe_apply_chat_template`, then prompt and completion texts
    tokenized without special tokens, as its DPOTrainer does): the prompt tokens are equal; TRL's completion is
    ours followed by what the template writes after the end-of-turn token (AFTER_END). We differ there on
    purpose: generation stops at the end-of-turn token, so those tokens are never generated by the model and
    training them as targets (TRL) teaches a continuation past the stop; chat.py's SFT targets end there too."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from llmlab.data.formats import PreferenceFormat

    tok = tokenizers[template]
    pairs = PreferenceFormat(tok, 512).build([EXPLICIT, IMPLICIT], "train")
    for record, pair in zip((EXPLICIT, IMPLICIT), pairs):
        trl = maybe_apply_chat_template(maybe_extract_prompt(dict(record)), tok)
        for key in ("chosen", "rejected"):
            row = pair[key]
            n = row["prompt_length"]
            assert row["input_ids"][:n] == tok(trl["prompt"], add_special_tokens=False)["input_ids"]
            trl_completion = tok(trl[key], add_special_tokens=False)["input_ids"]
            ours = row["input_ids"][n:]
            assert trl_completion[:len(ours)] == ours
            assert tok.decode(trl_completion[len(ours):]) == AFTER_END[template]


def test_kto_conversations(tokenizers):
    """KTO's conversational unpaired records {prompt: [...], completion: [assistant], label}, and conversational
    preference pairs unpaired (chosen -> true, rejected -> false): prompt and completion as for preference."""
    from llmlab.data.unpaired import UnpairedFormat

    tok = tokenizers["qwen3"]
    record = {"prompt": EXPLICIT["prompt"], "completion": EXPLICIT["rejected"], "label": False}
    ex, good, bad = UnpairedFormat(tok, 512).build([record, EXPLICIT], "train")
    assert ex["prompt_ids"] == template_ids(tok, EXPLICIT["prompt"], add_generation_prompt=True)
    assert tok.decode(ex["completion_ids"]) == expected_target("qwen3", "Nobody.")
    assert ex["desirable"] is False and (good["desirable"], bad["desirable"]) == (True, False)
    assert target_runs(good, tok) == [expected_target("qwen3", "First Citizen.")]
    assert bad["input_ids"] == ex["input_ids"]  # the same prompt and completion, given either way


@pytest.mark.slow  # importing TRL takes 6-12 s here
@pytest.mark.parametrize("template", ["llama3", "qwen3"])
def test_kto_conversations_equal_trl(tokenizers, template):
    """KTO's conversational record as TRL renders it (the same difference after the end-of-turn token)."""
    from trl.data_utils import maybe_apply_chat_template

    from llmlab.data.unpaired import UnpairedFormat

    tok = tokenizers[template]
    record = {"prompt": EXPLICIT["prompt"], "completion": EXPLICIT["rejected"], "label": False}
    [ex] = UnpairedFormat(tok, 512).build([record], "train")
    trl = maybe_apply_chat_template(dict(record), tok)
    assert ex["prompt_ids"] == tok(trl["prompt"], add_special_tokens=False)["input_ids"]
    trl_completion = tok(trl["completion"], add_special_tokens=False)["input_ids"]
    assert trl_completion[:len(ex["completion_ids"])] == ex["completion_ids"]
    assert tok.decode(trl_completion[len(ex["completion_ids"]):]) == AFTER_END[template]


@pytest.mark.parametrize("record,needle", [
    ({"prompt": EXPLICIT["prompt"], "chosen": [{"role": "user", "content": "x"}], "rejected": EXPLICIT["rejected"]},
     "must end with an assistant message"),
    ({"prompt": EXPLICIT["prompt"], "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "rejected": EXPLICIT["rejected"]}, "assistant messages only"),
    ({"prompt": MULTI["messages"][:3], "chosen": EXPLICIT["chosen"], "rejected": EXPLICIT["rejected"]},
     "each prompt must end with a user or tool message"),
    ({"prompt": EXPLICIT["prompt"], "chosen": "First Citizen.", "rejected": EXPLICIT["rejected"]},
     "all as message lists"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "share 0 of 2/2"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": EXPLICIT["chosen"], "rejected": EXPLICIT["rejected"]},
     "unknown role 'wizard'"),
])
def test_bad_preference_conversations_are_one_line_errors(tokenizers, record, needle):
    from llmlab.data.formats import PreferenceFormat

    with pytest.raises(DataError) as err:
        PreferenceFormat(tokenizers["qwen2_5"], 512).build([record], "train")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_conversational_preference_needs_a_chat_template():
    from llmlab.data.formats import PreferenceFormat

    tok = family_tokenizer("llama3")
    tok.chat_template = None
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        PreferenceFormat(tok, 512).build([EXPLICIT], "train")


def test_implicit_prompt_with_a_none_prompt_column(tokenizers):
    """A .jsonl mixing explicit and implicit records: `datasets` gives the implicit ones prompt=None, which is no
    prompt (the shared prefix is), not a text prompt mixed with message lists."""
    from llmlab.data.formats import PreferenceFormat

    fmt = PreferenceFormat(tokenizers["llama3"], 512)
    assert fmt.build([{**IMPLICIT, "prompt": None}], "train") == fmt.build([IMPLICIT], "train")


@pytest.mark.parametrize("template", ["llama3", "qwen3"])
def test_trl_prompt_completion_record_trains_only_the_completion(tokenizers, template):
    """TRL's conversational prompt/completion record for SFT: the tokens are the template's rendering of prompt +
    completion, and only the completion is a target (TRL's completion_only_loss); an assistant turn inside the
    prompt is context. The same record as `messages` would train both assistant turns."""
    tok = tokenizers[template]
    prompt, completion = MULTI["messages"][:4], MULTI["messages"][4:]
    rows = SFTFormat(tok, 512).build([{"prompt": prompt, "completion": completion}], "train")
    assert len(rows) == 1 and rows[0]["input_ids"] == template_ids(tok, prompt + completion)
    assert target_runs(rows[0], tok) == [expected_target(template, "All: Speak, speak.")]
    assert rows[0]["answer"] == "All: Speak, speak."
    whole = SFTFormat(tok, 512).build([{"messages": prompt + completion}], "train")
    assert sum(len(target_runs(r, tok)) for r in whole) == 2
    with pytest.raises(DataError, match="'completion': after the prompt a completion must be assistant messages"):
        SFTFormat(tok, 512).build([{"prompt": prompt[:2], "completion": [prompt[2], {"role": "user", "content": "x"},
                                                                         completion[0]]}], "train")
