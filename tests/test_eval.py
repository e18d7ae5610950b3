"""`python -m llmlab.eval` and friends, through the real lm-evaluation-harness, offline.

- the task sets compose and check; llmlab's shipped task YAMLs index in lm-eval's TaskManager;
- `builtin` on the cached SFT'd tiny model vs an untrained tiny model: multiple-choice accuracy of the
  SFT'd model far above the untrained one and above chance; lm-eval's generative exact match equals
  llmlab's own held-out exact match (llmlab.evaluation.generation.greedy_answers + llmlab.evaluation.metrics.ExactMatch) on
  the same items: the same count, tolerance 0;
- perplexity on a local text file equals a hand computation of the same log-likelihoods;
- a LoRA run and a QLoRA run (a few steps from tiny-sft) evaluated as exported (base + hf_adapter/,
  4-bit for QLoRA): exact match equals the run's own `val_exact_match_last` on the same items, and the
  eval callback logged at the steps asked, with the same numbers as the after-training evaluation.
"""
from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF, FAST, assert_ok, run_module

TASK_SETS = sorted(p.stem for p in (CONF / "eval").glob("*.yaml"))


def task_set(name: str, **overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"eval={name}", "path=/x", *[f"{k}={v}" for k, v in overrides.items()]])
    return cfg


@pytest.mark.parametrize("name", TASK_SETS)
def test_task_set_composes_and_checks(name, tmp_path, monkeypatch):
    from llmlab.errors import ConfigError
    from llmlab.evaluation.harness import check_task_set

    text = tmp_path / "t.txt"
    text.write_text("one document.\n\nanother one.\n")
    cfg = task_set(name, **({"eval.text_file": str(text)} if name == "perplexity" else {}))
    assert cfg.eval.name == name and cfg.eval.tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if name == "course":  # stock tasks: known names, but their data needs the hub
        with pytest.raises(ConfigError, match="Hugging Face hub"):
            check_task_set(cfg.eval)
    else:
        check_task_set(cfg.eval)


def test_shipped_task_yamls_index_in_lm_eval():
    from lm_eval.tasks import TaskManager

    from llmlab.evaluation.harness import TASK_DIR, own_tasks

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(own_tasks()) == {"llmlab_builtin_mc", "llmlab_builtin_em", "llmlab_perplexity"}
    assert set(own_tasks()) <= set(manager.all_tasks)


def test_mc_items_have_four_distinct_choices_and_one_answer(tmp_path):
    from llmlab.evaluation.harness import write_builtin_data

    write_builtin_data(tmp_path, 200, 0, "Q: {prompt} A: ", "<eos>")
    mc = [json.loads(x) for x in (tmp_path / "llmlab_builtin_mc.jsonl").read_text().splitlines()]
    em = [json.loads(x) for x in (tmp_path / "llmlab_builtin_em.jsonl").read_text().splitlines()]
    assert len(mc) == len(em) == 200
    assert all(len(set(d["choices"])) == 4 and all(c.endswith("<eos>") for c in d["choices"]) for d in mc)
    labels = [d["label"] for d in mc]
    assert min(labels) == 0 and max(labels) == 3  # the answer's position is shuffled
    assert em[0]["context"].startswith("Q: ") and em[0]["context"].endswith(" A: ")


# ------------------------------------------------------------------------------------------------
# real models
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny GPT-2 with random weights (conf/model/tiny.yaml) and llmlab's byte tokenizer."""
    import torch

    from llmlab.models.build import build_model, build_tokenizer

    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    tokenizer = build_tokenizer(cfg)
    return build_model(cfg, tokenizer).eval(), tokenizer


def llmlab_exact_match(model, tokenizer, n: int) -> tuple[int, int]:
    """llmlab's own held-out exact match (stage=sft's validation code) on sft_examples(n, 'val', 0)."""
    from llmlab.data.builtin import sft_examples
    from llmlab.data.formats import SFTFormat
    from llmlab.evaluation.harness import DEFAULT_TEMPLATE
    from llmlab.evaluation.metrics import ExactMatch
    from llmlab.evaluation.generation import greedy_answers

    fmt = SFTFormat(tokenizer, 128, prompt_template=DEFAULT_TEMPLATE)
    examples, metric = fmt.build(sft_examples(n, "validation", 0), "val"), ExactMatch()
    for i in range(0, len(examples), 32):
        batch = fmt.collate(examples[i:i + 32])
        metric.update(greedy_answers(model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], 16), batch["answers"])
    return int(metric.correct), int(metric.total)


@pytest.mark.slow
def test_builtin_sft_model_beats_untrained_and_matches_llmlab_exact_match(tmp_path, untrained):
    from llmlab.models.bases import ensure_base
    from llmlab.evaluation.harness import evaluate
    from llmlab.models.load import load

    sft_dir, n = ensure_base("tiny-sft"), 64
    proc = run_module("llmlab.eval", sft_dir, f"limit={n}", f"out={tmp_path / 'eval.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llmlab_builtin_mc" in proc.stdout  # the table
    sft = json.loads((tmp_path / "eval.json").read_text())
    import lm_eval

    assert sft["lm_eval_version"] == lm_eval.__version__
    mc, em = sft["tasks"]["llmlab_builtin_mc"], sft["tasks"]["llmlab_builtin_em"]
    assert mc["version"] == 1.0 and mc["n_samples"] == n and mc["stderr"]["acc"] is not None

    model, tokenizer = untrained
    base = evaluate(model, tokenizer, OmegaConf.load(CONF / "eval" / "builtin.yaml"), limit=n)
    base_acc = base["tasks"]["llmlab_builtin_mc"]["metrics"]["acc"]
    print(f"MC acc: sft {mc['metrics']['acc']:.3f}, untrained {base_acc:.3f}; "
          f"EM sft {em['metrics']['exact_match']:.3f}")
    assert mc["metrics"]["acc"] > 0.25 + 0.4  # chance is 1/4
    assert mc["metrics"]["acc"] > base_acc + 0.4
    # lm-eval's generate_until exact match == llmlab's own validation exact match, item for item count
    sft_model, sft_tok = load(sft_dir)
    correct, total = llmlab_exact_match(sft_model, sft_tok, n)
    assert total == n and round(em["metrics"]["exact_match"] * n) == correct
    assert correct > 0.5 * n


@pytest.mark.slow
def test_perplexity_equals_hand_computed_log_likelihood(tmp_path, untrained):
    import torch

    from llmlab.evaluation.harness import evaluate

    docs = ["the reverse of cab is bac. abc sorted is abc.", "dcba shifted by one is edcb.\nmore text here"]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    ts = OmegaConf.load(CONF / "eval" / "perplexity.yaml")
    ts.text_file = str(tmp_path / "corpus.txt")
    model, tokenizer = untrained
    got = evaluate(model, tokenizer, ts)["tasks"]["llmlab_perplexity"]["metrics"]
    # by hand: each document scored from the EOS token (lm-eval's rolling prefix), one byte per token
    total, n_bytes, words = 0.0, 0, 0
    for doc in docs:
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # (T-1, V)
        total += logp.gather(-1, ids[0, 1:, None]).sum().item()
        n_bytes, words = n_bytes + len(doc.encode()), words + len(doc.split())
    assert got["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-4)


def _peft_run(cli, method: str, every_n_steps):
    run = cli("stage=sft", "model=tiny_sft", f"peft={method}", *FAST, "callbacks=with_eval",
              "callbacks.lm_eval.limit=32", f"callbacks.lm_eval.every_n_steps={every_n_steps}")
    assert_ok(run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method,load,every,steps", [("lora", "adapter", "null", [0, 3, 6]),
                                                     ("qlora", "auto", 6, [0, 6])])
def test_peft_run_evaluated_as_exported(cli, method, load, every, steps):
    """FAST: 6 steps, validation every 3 on data.n_val=32 held-out items; the eval callback on the same 32
    items at the steps asked; then llmlab.eval on the run (adapter on the run's base; QLoRA: 4-bit)."""
    run = _peft_run(cli, method, every)
    history = json.loads((run.dir / "history.json").read_text())
    assert [p[0] for p in history["val/llmlab_builtin_mc/acc"]] == steps  # the callback ran when asked
    assert [p[0] for p in history["val/llmlab_builtin_em/exact_match"]] == steps
    proc = run_module("llmlab.eval", str(run.dir), f"load={load}", "limit=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run.dir / "eval.json").read_text())
    assert "hf_adapter" in result["loaded"]  # base + adapter, as trained (QLoRA: rebuilt 4-bit)
    summary = run.summary
    em = result["tasks"]["llmlab_builtin_em"]["metrics"]["exact_match"]
    # the same 32 items as the run's validation (seed 0, first 32 of the held-out split): equal
    assert em == pytest.approx(summary["val_exact_match_last"], abs=1e-9)
    assert em == pytest.approx(summary["val_llmlab_builtin_em_exact_match_last"], abs=1e-9)
    assert em > 0.5  # tiny-sft answers most held-out items
    mc = result["tasks"]["llmlab_builtin_mc"]["metrics"]["acc"]
    assert mc == pytest.approx(summary["val_llmlab_builtin_mc_acc_last"], abs=1e-9)
    # and into the run's own logger (metrics.csv)
    header = (run.dir / "metrics.csv").read_text().splitlines()[0]
    assert "eval/llmlab_builtin_mc/acc" in header


@pytest.mark.slow
@pytest.mark.distributed
def test_callback_under_zero3_logs_what_the_exported_model_scores(cli):
    """2 processes, ZeRO-3 (shards): the callback gathers the weights (generation_context), rank 0
    evaluates, every rank logs rank 0's numbers; the last ones equal lm-eval on the exported hf/.
    (Measured by hand: a DDP run of the same command logs the same numbers.)"""
    from llmlab.evaluation.harness import evaluate
    from llmlab.models.load import load

    run = cli("stage=sft", "model=tiny_base", "strategy=zero3", "trainer.devices=2", *FAST, "callbacks=with_eval",
              "callbacks.lm_eval.limit=16")
    assert_ok(run)
    history = json.loads((run.dir / "history.json").read_text())
    assert [p[0] for p in history["val/llmlab_builtin_mc/acc"]] == [0, 3, 6]
    model, tokenizer = load(str(run.dir / "hf"))
    after = evaluate(model, tokenizer, OmegaConf.load(CONF / "eval" / "builtin.yaml"), limit=16)
    assert after["tasks"]["llmlab_builtin_mc"]["metrics"]["acc"] == run.summary["val_llmlab_builtin_mc_acc_last"]


def test_template_auto_follows_how_the_run_was_trained():
    """template=auto: a run trained with data.record_format=chat is scored through its chat template; a run with
    a prompt_template by that template; a pretraining run and a plain model by the built-in one (None)."""
    from llmlab.eval import run_template

    auto = OmegaConf.create({"template": "auto"})
    run = lambda stage, **data: OmegaConf.create({"stage": {"name": stage}, "data": data})  # noqa: E731
    assert run_template(auto, run("sft", record_format="chat", prompt_template="Q: {prompt}")) == "chat"
    assert run_template(auto, run("sft", record_format="auto", prompt_template="Q: {prompt}")) == "Q: {prompt}"
    assert run_template(auto, run("pretrain", record_format="chat")) is None
    assert run_template(auto, None) is None
    assert run_template(OmegaConf.create({"template": "none"}), run("sft", record_format="chat")) is None
