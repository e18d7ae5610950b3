"""Evaluation through EleutherAI's lm-evaluation-harness (`lm-eval`), shared by `python -m llmlab.eval`,
the training callback (llmlab/callbacks/evaluation.py) and the pipeline's `eval` step.

A task set (conf/eval/<name>.yaml) names lm-eval tasks: stock ones (the course's ARC, HellaSwag, MMLU,
TruthfulQA: their datasets come from the hub) or llmlab's own task YAMLs (llmlab/evaluation/tasks/: built-in
held-out data written as jsonl at run time, and perplexity of a local text file). Everything that can
be checked without torch is checked first (`check_task_set`): unknown task names (with close ones), a
hub task set while offline, a missing text file (for the training callback: llmlab/checks/callbacks.py).

The model is handed to lm-eval as an object (`lm_eval.models.huggingface.HFLM(pretrained=<model>)`),
so a run's model is evaluated exactly as llmlab loaded it (a PEFT adapter on a 4-bit base included).

Chat models: `template=chat` hands the rendering to lm-eval's own `apply_chat_template` route (what its CLI's
`--apply_chat_template` sets): every task's context, stock tasks included, becomes a user message rendered with
the tokenizer's chat template and its generation prompt (`HFLM.apply_chat_template`, the same
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` as llmlab's generate and rollouts), encoded
without a second BOS (lm-eval 0.4.13 drops add_special_tokens when the text starts with BOS); llmlab's built-in
contexts are then the bare prompts (no "Question: ... Answer:" frame). Rendering the built-in contexts here
instead would leave the stock tasks (ARC, MMLU, ...) unrendered, and lm-eval's route also handles few-shot
examples (as one user turn, or `fewshot_as_multiturn`). Generation stops at the model's generation_config EOS
ids (lm-eval passes no eos_token_id, so HF uses that list) and at the tokenizer's EOS text (lm-eval's `until`).
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmlab.checks.hub import hub_reachable
from llmlab.data.builtin import ALPHABET, TASKS, preference_pairs, sft_examples
from llmlab.errors import ConfigError
from llmlab.evaluation.tasks.utils import read_documents

CONF = Path(__file__).resolve().parents[2] / "conf"
TASK_DIR = Path(__file__).resolve().parent / "tasks"  # llmlab's own task YAMLs (shipped in the package)
DEFAULT_TEMPLATE = "Question: {prompt}\n\nAnswer: "  # conf/data/builtin.yaml's prompt_template
CHAT = "chat"  # template=chat: contexts through the model's chat template (lm-eval's apply_chat_template)


@functools.lru_cache(maxsize=1)
def own_tasks() -> tuple[str, ...]:
    """Task names of llmlab's shipped YAMLs (their `task:` line)."""
    names = []
    for path in sorted(TASK_DIR.glob("*.yaml")):
        m = re.search(r"^task:\s*(\S+)", path.read_text(), re.M)
        if m:
            names.append(m.group(1))
    return tuple(names)


@functools.lru_cache(maxsize=1)
def stock_tasks() -> frozenset[str]:
    """Task, group and tag names of lm-eval's own task YAMLs, read as text (~1 s; lm-eval's TaskManager
    parses all ~14k YAMLs, ~9 s). Tags may be a scalar or a list."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ConfigError("lm-eval is not installed; pip install 'lm-eval[hf]' (or llmlab[eval])")
    names: set[str] = set()
    for path in (Path(spec.origin).parent / "tasks").rglob("*.yaml"):
        lines = path.read_text(errors="ignore").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(task|group|tag):[ \t]*([^#\n]*)", line)
            if not m:
                continue
            value = m.group(2).strip().strip("'\"")
            if value:
                names.add(value.strip("[]").split(",")[0].strip())
            elif m.group(1) == "tag":  # a list of tags on the following lines
                for item in lines[i + 1:]:
                    item_m = re.match(r"^\s+-\s+(\S+)", item)
                    if not item_m:
                        break
                    names.add(item_m.group(1).strip("'\""))
    return frozenset(names)


def hub_offline() -> bool:
    """True when datasets cannot come from the hub: offline mode set, or the hub unreachable."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return not hub_reachable()


def check_task_set(task_set, setting: str | None = None) -> None:
    """Config-only checks of a task set node (conf/eval/*.yaml), before any model loads; `setting` names
    where it was chosen (default `eval=<name>`)."""
    setting = setting or f"eval={task_set.get('name')}"
    tasks = list(task_set.get("tasks") or [])
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"eval.tasks={tasks}: give a list of lm-eval task names, e.g. eval.tasks=[arc_easy]")
    ours = set(own_tasks())
    unknown = [t for t in tasks if t not in ours]
    if unknown:
        known = ours | stock_tasks()
        bad = [t for t in unknown if t not in known]
        if bad:
            close = difflib.get_close_matches(bad[0], sorted(known), n=4, cutoff=0.6)
            hint = f"close ones: {', '.join(close)}" if close else "`lm-eval ls tasks` lists them"
            raise ConfigError(f"eval.tasks: unknown lm-eval task {bad[0]!r}; {hint}")
    stock = [t for t in tasks if t not in ours]
    if stock and hub_offline():
        raise ConfigError(f"{setting}: tasks {', '.join(stock)} download their datasets from "
                          f"the Hugging Face hub, which is offline here (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE or no "
                          f"network); run it with internet access, or use eval=builtin / eval=perplexity offline")
    if "llmlab_perplexity" in tasks:
        text_file = task_set.get("text_file")
        if not text_file:
            raise ConfigError("eval.text_file is not set: eval=perplexity scores a local text file; give "
                              "eval.text_file=/abs/path.txt (documents separated by blank lines) or a .jsonl")
        path = Path(str(text_file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.text_file={text_file}: no such file; give a .txt or .jsonl file")
        try:
            if not read_documents(str(path)):
                raise ConfigError(f"eval.text_file={text_file} is empty: it has no document to score")
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"eval.text_file={text_file}: cannot read it ({type(err).__name__}); a .jsonl has "
                              f"one object with a `text` field per line") from None


def load_task_set(task_set, setting: str = "callbacks.lm_eval.task_set"):
    """A task set node: a conf/eval name ("builtin"), or a mapping like conf/eval/*.yaml."""
    if isinstance(task_set, (dict, DictConfig)):
        return OmegaConf.create(task_set)
    path = CONF / "eval" / f"{task_set}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONF / "eval").glob("*.yaml"))
        close = difflib.get_close_matches(str(task_set), names, n=1)
        raise ConfigError(f"{setting}={task_set!r}: no such task set; "
                          f"{'did you mean ' + close[0] + '?' if close else 'known: ' + ', '.join(names)}")
    return OmegaConf.load(path)


# --------------------------------------------------------------------------------------------------
# llmlab's built-in held-out data as jsonl (the same instances as the stages' validation splits)
# --------------------------------------------------------------------------------------------------


def mc_choices(pair: dict, x: str, task: str) -> list[str]:
    """chosen, rejected and two more wrong answers (other tasks' answers, else one letter changed), unique."""
    choices = [pair["chosen"], pair["rejected"]]
    candidates = [TASKS[t](x) for t in sorted(TASKS) if t != task]
    candidates += [pair["chosen"][:i] + c + pair["chosen"][i + 1:] for i in range(len(pair["chosen"]))
                   for c in ALPHABET]
    for cand in candidates:
        if len(choices) == 4:
            break
        if cand not in choices:
            choices.append(cand)
    return choices


def write_builtin_data(data_dir: Path, n: int, seed: int, template: str, eos: str) -> None:
    """llmlab_builtin_em.jsonl: the SFT validation instances `sft_examples(n, "validation", seed)` (what
    stage=sft/dpo validate on, in that order); llmlab_builtin_mc.jsonl: the preference validation
    pairs with four choices, each ending with the EOS token text."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "llmlab_builtin_em.jsonl", "w") as f:
        for ex in sft_examples(n, "validation", seed):
            f.write(json.dumps({"context": template.format(prompt=ex["prompt"]), "answer": ex["response"]}) + "\n")
    rng = random.Random(f"{seed}/llmlab_builtin_mc")
    with open(data_dir / "llmlab_builtin_mc.jsonl", "w") as f:
        for pair in preference_pairs(n, "validation", seed):
            task, x = pair["prompt"].split(" ", 1)
            choices = mc_choices(pair, x, task)
            rng.shuffle(choices)
            f.write(json.dumps({"context": template.format(prompt=pair["prompt"]),
                                "choices": [c + eos for c in choices],
                                "label": choices.index(pair["chosen"])}) + "\n")


# --------------------------------------------------------------------------------------------------
# running lm-eval
# --------------------------------------------------------------------------------------------------


def _scalar(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN (lm-eval's "N/A" stderr) -> None


def tidy_results(res: dict) -> dict:
    """lm-eval's result dict -> {task: {metrics: {name: value}, stderr: {name: value}, version, n}}."""
    out = {}
    for task, values in (res.get("results") or {}).items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key:
                continue
            name, _filter = key.split(",", 1)
            if name.endswith("_stderr"):
                stderr[name.removesuffix("_stderr")] = _scalar(value)
            else:
                metrics[name] = _scalar(value)
        n = (res.get("n-samples") or {}).get(task, {})
        out[task] = {"metrics": metrics, "stderr": stderr, "version": (res.get("versions") or {}).get(task),
                     "n_samples": n.get("effective", n.get("original")) if isinstance(n, dict) else n}
    return out


def prefix_token(tokenizer) -> int | None:
    """The token a document is scored from (rolling log-likelihood, empty contexts): the BOS the tokenizer
    itself starts sequences with (Llama), else EOS (GPT-2's convention; llmlab's byte tokenizer defines a
    BOS that no llmlab data uses, and lm-eval would pick it by default)."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else tokenizer.eos_token_id


def evaluate(model, tokenizer, task_set, *, limit=None, num_fewshot=None, batch_size: int = 8,
             gen_kwargs: dict | None = None, template: str | None = None, autocast_dtype=None,
             seed: int = 0, log_samples: bool = False) -> dict:
    """Run the task set on an in-memory model; returns {"tasks": tidy results, "lm_eval_version", ...}.

    `template` renders llmlab's built-in prompts (default: the built-in data's "Question: ..."); `chat`: every
    task's context through the model's chat template (module docstring).
    `autocast_dtype` (e.g. torch.bfloat16) evaluates under autocast, as a bf16-mixed run validated.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not any(t not in own_tasks() for t in task_set.tasks):  # local data only: never ask the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # lazy: lm-eval is heavy and optional, and datasets (which it imports) reads HF_DATASETS_OFFLINE once
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tasks = list(task_set.tasks)
    stock = any(t not in own_tasks() for t in tasks)
    # `model` may be an lm-eval model already: a GGUF export evaluated by llama.cpp (evaluation/llamacpp_lm.py)
    ready = isinstance(model, LM)
    was_training = not ready and model.training
    if not ready:
        model.eval()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmlab_eval_") as data_dir:
        data = task_set.get("data") or {}
        chat = template == CHAT
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template=chat: this model's tokenizer has no chat template; use template=auto, none "
                              "or a '{prompt}' template")
        write_builtin_data(Path(data_dir), int(data.get("n", 200)), int(data.get("seed", 0)),
                           "{prompt}" if chat else template or DEFAULT_TEMPLATE,
                           (model if ready else tokenizer).eos_token or "")
        metadata = {"data_dir": data_dir}
        if task_set.get("text_file"):
            metadata["text_file"] = str(Path(str(task_set.text_file)).expanduser().resolve())
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=stock, metadata=metadata)
        lm = model if ready else HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size),
                                      prefix_token_id=prefix_token(tokenizer), mixed_precision_dtype=autocast_dtype,
                                      device=str(next(model.parameters()).device))
        res = _keeping_rng_state(
            lm_eval.simple_evaluate, model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            apply_chat_template=chat,
            gen_kwargs=dict(gen_kwargs) if gen_kwargs else None, log_samples=log_samples, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    if not ready:
        model.train(was_training)
    out = {"task_set": task_set.get("name"), "tasks": tidy_results(res), "lm_eval_version": lm_eval.__version__,
           "num_fewshot": num_fewshot, "limit": limit, "seconds": round(time.perf_counter() - t0, 2)}
    if log_samples:
        out["samples"] = res.get("samples")
    return out


def _keeping_rng_state(fn, *args, **kwargs):
    """lm-eval seeds python, numpy and torch's global generators; during training (the callback) that
    would reset dropout's randomness at every evaluation: their states are put back afterwards."""
    # lazy: llmlab.checks imports this module (check_task_set) before torch loads
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return fn(*args, **kwargs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """{"<prefix><task>/<metric>": value} of an `evaluate` result (for loggers and comparisons)."""
    return {f"{prefix}{task}/{name}": value for task, r in result["tasks"].items()
            for name, value in r["metrics"].items() if value is not None}


def table_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(task, version, metric, value, stderr) rows for printing."""
    rows = []
    for task, r in result["tasks"].items():
        for name, value in r["metrics"].items():
            err = r["stderr"].get(name)
            rows.append((task, str(r["version"]), name, "-" if value is None else f"{value:.4f}",
                         "-" if err is None else f"{err:.4f}"))
    return rows
