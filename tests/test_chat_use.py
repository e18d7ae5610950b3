"""The chat template at use time (issue 21, point 7) and a thinking model's answers (Qwen 3's <think>):
`llmlab.generate`, grpo/ppo rollouts and lm-eval render conversational prompts exactly as
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` and stop at every end-of-turn / EOS id
(generation_config's list included); exact match compares a thinking model's final answer.

The stopping tests use a real tiny Llama (tests/families.py) whose LM-head rows of <|eot_id|> and of a token t it
generates greedily are swapped: the model then says <|eot_id|> exactly where it said t (its other logits are
untouched), so where generation stops is known in advance and a run that ignores the end-of-turn token runs on.
"""
from __future__ import annotations

import json

import pytest
import torch

from llmlab.data.chat import stop_ids
from llmlab.data.formats import PromptFormat
from llmlab.errors import ConfigError
from llmlab.evaluation.generation import generate_text, render_prompts
from llmlab.evaluation.metrics import REASONING, ExactMatch, normalize_answer
from llmlab.stages.ppo import response_mask
from tests.families import family_tokenizer

ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who speaks first?"}]
TEMPLATES = ["llama3", "qwen2_5", "qwen3", "gemma3", "phi3_5"]


def template_ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True))


# --------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("template", TEMPLATES)
def test_rollout_and_generate_prompts_are_the_templates(template):
    """grpo/ppo prompts (PromptFormat) of TRL's conversational prompt-only records, of chat records and, with
    data.record_format=chat, of prompt strings; and generate's prompts (render_prompts): all exactly
    apply_chat_template(..., add_generation_prompt=True), one BOS."""
    tok = family_tokenizer(template)
    ask = ASK if template != "gemma3" else ASK[1:]  # (Gemma 3 folds a system message into the user turn: same)
    records = [{"prompt": ask, "answer": "First Citizen."},
               {"messages": ask + [{"role": "assistant", "content": "First Citizen."}]}]
    want = template_ids(tok, ask)
    rows = PromptFormat(tok, 512).build(records, "train")
    assert [r["prompt_ids"] for r in rows] == [want, want]
    assert rows[0]["answer"] == "First Citizen."
    plain = [{"role": "user", "content": "Who speaks first?"}]
    [row] = PromptFormat(tok, 512, record_format="chat").build([{"prompt": "Who speaks first?"}], "train")
    assert row["prompt_ids"] == template_ids(tok, plain)
    if tok.bos_token_id is not None:
        assert want.count(tok.bos_token_id) == 1
    texts = render_prompts(tok, [ask, "Who speaks first?"], "chat")
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == [want, template_ids(tok, plain)]
    assert render_prompts(tok, ["x"], "Q: {prompt} A:") == ["Q: x A:"]  # text templates as before


def test_chat_prompts_need_a_chat_template():
    tok = family_tokenizer("llama3")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="need a tokenizer with a chat template") as err:
        render_prompts(tok, ["hi"], "chat")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------- stop ids
def test_stop_ids_collect_generation_config_tokenizer_and_end_of_turn():
    from transformers import GenerationConfig

    tok = family_tokenizer("llama3")  # EOS <|eot_id|>, as Llama 3 Instruct's tokenizer
    eot, end = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert stop_ids(tok, GenerationConfig(eos_token_id=[end, eot])) == [end, eot]  # Llama 3 Instruct's list
    tok.eos_token = "<|end_of_text|>"  # a base model's tokenizer: EOS is not the template's end of turn
    assert stop_ids(tok, GenerationConfig(eos_token_id=end)) == [end, eot]
    qwen = family_tokenizer("qwen2_5")
    assert stop_ids(qwen, None) == [qwen.convert_tokens_to_ids("<|im_end|>")]
    from llmlab.data.tokenizer import builtin_tokenizer

    byte = builtin_tokenizer()  # its template ends turns with text only: no end-of-turn token to add
    assert stop_ids(byte, None) == [byte.eos_token_id]


def test_response_mask_stops_at_any_stop_id():
    responses = torch.tensor([[5, 7, 9, 2], [7, 3, 3, 3], [4, 4, 4, 4]])  # (B=3, R=4)
    budgets = torch.tensor([4, 4, 3])
    mask = response_mask(responses, budgets, [9, 3])
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True, True, True, False]]
    assert response_mask(responses, budgets, 3).tolist()[0] == [True] * 4  # one id, as before


# --------------------------------------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """(dir, tokenizer, prompt, s, k): a tiny Llama saved with a base-model tokenizer (EOS <|end_of_text|>,
    generation_config.eos_token_id the same), whose greedy continuation of the chat prompt is s without stopping,
    and which, after the row swap, says <|eot_id|> at step k (where it said s[k])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.families import build_family

    path = build_family("llama", tmp_path_factory.mktemp("talker") / "llama")
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = "<|end_of_text|>"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    end, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = end
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # not tied
    prompt = render_prompts(tok, [ASK], None)[0]
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    # The precondition, made rather than hoped for: a random model may say an end token within 10 steps (the
    # Llama built on the fallback tokenizer, without ../shared, said <|end_of_text|> at step 3). Wherever it
    # does, its head row is swapped with an ordinary token's that the continuation never says: the model then
    # says that token there instead, and never an end token.
    specials = set(tok.all_special_ids) | {end, eot}
    ordinary = (i for i in range(len(tok)) if i not in specials)
    for _ in range(10):
        with torch.no_grad():
            s = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               eos_token_id=end, pad_token_id=end)[0, ids.shape[1]:].tolist()
        said = [t for t in (end, eot) if t in s]
        if not said:
            break
        for t in said:
            x = next(i for i in ordinary if i not in s)
            with torch.no_grad():
                model.lm_head.weight[[t, x]] = model.lm_head.weight[[x, t]]
    assert len(s) == 10 and eot not in s and end not in s
    k = next(i for i in range(2, 10) if s[i] not in s[:i])
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eot, s[k]]] = w[[s[k], eot]]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, prompt, s, k


def test_generation_stops_at_the_end_of_turn_token(talker):
    """generate_text (generate, samples, validation) stops at the template's <|eot_id|> although neither the
    tokenizer's EOS nor generation_config names it; HF's generate given only the tokenizer's EOS (what llmlab
    passed before) runs on past it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, prompt, s, k = talker
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    [text] = generate_text(model, tok, [prompt], 10, do_sample=False)
    assert text == tok.decode(s[:k])
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    assert out.tolist()[k] == eot and len(out) == 10  # the end of turn is said, and generation runs on


def test_generation_config_eos_list_is_honoured(talker):
    """generation_config.eos_token_id = [<|end_of_text|>, s[m]]: generation stops at s[m] (m < k), the second
    id of the list; the tokenizer's EOS alone (llmlab before) would have overridden the list."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, prompt, s, k = talker
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    m = next(i for i in range(1, k) if s[i] not in s[:i])
    model.generation_config.eos_token_id = [tok.eos_token_id, s[m]]
    [text] = generate_text(model, tok, [prompt], 10, do_sample=False)
    assert text == tok.decode(s[:m + 1])


def test_grpo_rollout_stops_at_the_end_of_turn_token(talker):
    """A grpo rollout of a conversational prompt-only record (PromptFormat -> rollout): every completion
    ends with <|eot_id|> at step k, kept as the last action (mask), not truncated; the text is the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_grpo import grpo_module

    path, prompt, s, k = talker
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    fmt = PromptFormat(tok, 512)
    batch = fmt.collate(fmt.build([{"prompt": ASK, "answer": "x"}], "train"))
    assert batch["prompt_ids"][0].tolist() == template_ids(tok, ASK)
    module = grpo_module(model, tok, rollout_batch_size=2, num_generations=2, max_completion_length=10,
                         temperature=1e-4)  # sampling as sharp as greedy: the rollout is s up to the stop
    ro = module.rollout(batch)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ro["mask"].sum(1).tolist() == [k + 1, k + 1]
    assert ro["completions"][:, k].tolist() == [eot, eot] and not ro["truncated"].any()
    assert ro["texts"] == [tok.decode(s[:k])] * 2


def test_generate_cli_renders_conversations_and_stops(talker, tmp_path, capsys):
    """python -m llmlab.generate DIR prompts_file=x.jsonl (a conversation) and prompt=... template=chat: the chat
    template's prompt, stopped at the end of turn."""
    from llmlab.generate import main

    path, prompt, s, k = talker
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": ASK}) + "\n")
    assert main([str(path), f"prompts_file={prompts}", "max_new_tokens=10"]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line) == {"prompt": ASK, "generated": tok.decode(s[:k])}
    assert main([str(path), "prompt=Who speaks first?", "template=chat", "max_new_tokens=3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_generate_refuses_bad_conversations_in_one_line(tmp_path, capsys):
    from llmlab.generate import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), f"prompts_file={prompts}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("llmlab: error:") and "unknown role 'narrator'" in err
    assert "\n" not in err


# --------------------------------------------------------------------------------------------------- <think>
@pytest.mark.parametrize("generated,answer", [
    ("<think>\n\n</think>\n\nFirst Citizen.", "First Citizen."),  # Qwen 3, thinking off (empty block)
    ("<think>\nwho? the citizen\n</think>\n\nFirst Citizen.", "First Citizen."),  # Qwen 3 thinking
    ("the citizen, surely</think>First Citizen.", "First Citizen."),  # DeepSeek-R1: <think> was in the prompt
    ("<think>\nstill thinking when the budget ran out", ""),  # reasoning cut off: no answer
    ("  First Citizen. ", "First Citizen."),  # a plain model: as before
    ("First Citizen. <think>", "First Citizen. <think>"),  # only a leading block is reasoning
])
def test_exact_match_compares_the_final_answer(generated, answer):
    assert normalize_answer(generated) == answer
    em = ExactMatch()
    em.update([generated], ["First Citizen."])
    assert float(em.compute()) == float(answer == "First Citizen.")


def test_lm_eval_task_ignores_the_same_reasoning_block():
    """llmlab_builtin_em (lm-eval) strips with the same pattern as metrics.REASONING, first."""
    from llmlab.evaluation.harness import TASK_DIR

    text = (TASK_DIR / "llmlab_builtin_em.yaml").read_text()
    line = next(x for x in text.splitlines() if "regexes_to_ignore" in x)
    assert json.loads(line.split(":", 1)[1])[0] == REASONING.pattern


def test_qwen3_validation_answer_is_judged_after_its_think_block():
    """SFT's validation of a Qwen 3 chat record: the prompt is the template's generation prompt (thinking on, no
    block in it) and the trained target starts with the template's <think></think> block, so a model that learned
    its target answers with the block first; exact match against the record's answer counts it correct."""
    from llmlab.data.formats import SFTFormat
    from llmlab.losses import IGNORE_INDEX

    tok = family_tokenizer("qwen3")
    fmt = SFTFormat(tok, 512)
    batch = fmt.collate(fmt.build([{"messages": ASK + [{"role": "assistant", "content": "First Citizen."}]}],
                                  "validation"))
    assert tok.decode(batch["prompt_ids"][0]).endswith("<|im_start|>assistant\n")
    target = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    learned = tok.decode(target, skip_special_tokens=True)  # what greedy_answers returns for that model
    assert learned == "<think>\n\n</think>\n\nFirst Citizen." and batch["answers"] == ["First Citizen."]
    em = ExactMatch()
    em.update([learned], batch["answers"])
    assert float(em.compute()) == 1.0


# --------------------------------------------------------------------------------------------------- lm-eval
@pytest.mark.slow  # lm-eval's import and task loading: ~15 s
def test_lm_eval_chat_route_renders_the_template(talker):
    """eval template=chat: lm-eval's apply_chat_template route gives each built-in context as the chat template
    renders one user message with its generation prompt, encoded with one BOS; its greedy answer stops at the
    end of turn."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.data.builtin import sft_examples
    from llmlab.evaluation.harness import evaluate

    path, prompt, s, k = talker
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    task_set = OmegaConf.create({"name": "em", "tasks": ["llmlab_builtin_em"], "data": {"n": 2, "seed": 0}})
    out = evaluate(model, tok, task_set, limit=2, template="chat", log_samples=True)
    samples = out["samples"]["llmlab_builtin_em"]
    examples = sft_examples(2, "validation", 0)
    assert len(samples) == 2
    for sample, ex in zip(samples, examples):
        context = sample["arguments"]["gen_args_0"]["arg_0"] if isinstance(sample["arguments"], dict) \
            else sample["arguments"][0][0]
        messages = [{"role": "user", "content": ex["prompt"]}]
        assert context == render_prompts(tok, [messages])[0]
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    ids, _ = lm.tok_batch_encode([render_prompts(tok, [ASK])[0]])
    assert ids[0].tolist() == template_ids(tok, ASK)  # one BOS: lm-eval adds none to a templated text


# --------------------------------------------------------------------------------------------------- runs
def _records(kind: str) -> list[dict]:
    """Conversational records of TRL's formats: preference (explicit and implicit prompt mixed in one file, so
    `datasets` fills the missing prompt column with None), KTO's unpaired, grpo's prompt-only."""
    rows = []
    for i in range(24):
        a, b = i % 9 + 1, i % 7 + 1
        q = [{"role": "user", "content": f"{a}+{b}?"}]
        good, bad = [{"role": "assistant", "content": str(a + b)}], [{"role": "assistant", "content": str(a + b + 1)}]
        if kind == "pref":
            rows.append({"prompt": q, "chosen": good, "rejected": bad} if i % 2 else
                        {"chosen": q + good, "rejected": q + bad})
        elif kind == "kto":
            rows.append({"prompt": q, "completion": good if i % 2 else bad, "label": bool(i % 2)})
        else:
            rows.append({"prompt": q, "answer": str(a + b)})
    return rows


@pytest.mark.slow  # four runs of a tiny Qwen 3 through the CLI, ~15 s each
@pytest.mark.parametrize("stage,kind,extra", [
    ("dpo", "pref", []), ("rm", "pref", []), ("kto", "kto", []),
    ("grpo", "prompts", ["stage.module.num_generations=4", "stage.module.max_completion_length=8"]),
])
def test_conversational_data_trains_each_stage(family_dir, cli, tmp_path, stage, kind, extra):
    """`python -m llmlab.run stage=<dpo|rm|kto|grpo> model=hf model.pretrained=<Qwen 3 dir>` on a .jsonl of TRL's
    conversational records trains a few steps and exports."""
    from tests.conftest import assert_ok

    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(kind)))
    run = cli(f"stage={stage}", "model=hf", f"model.pretrained={family_dir('qwen3')}", "data=text",
              f"data.train_files={data}", "data.val_fraction=0.25", "data.batch_size=4", "data.block_size=128",
              "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "trainer.enable_progress_bar=false", *extra)
    assert_ok(run)
    assert run.summary["status"] == "finished" and run.summary["global_step"] == 2
    assert (run.dir / "hf" / "config.json").is_file()
