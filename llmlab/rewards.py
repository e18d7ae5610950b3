"""Reward functions for the online RL stages (grpo, ppo): one place, one signature.

Every reward is a callable `(prompts, completions, **fields) -> list[float]` (one number per completion);
`fields` are the records' extra columns, one list per column (`answer`, ...), plus `completion_tokens`
(token counts) and `truncated` (no EOS within the budget). The `reward` config group composes several,
each a `_target_` node with a `weight`:

    python -m llmlab.run stage=grpo 'reward=[task,format]' reward.format.pattern='[a-h]+'

`Rewards` calls each, checks what it returned (length, numbers) and sums the weighted values; each
function's own mean is logged as `train/reward_<name>`. `ppo` takes the same group; its
`stage.reward_model=<run dir>` / `stage.rule_reward=<fn>` remain shortcuts for one reward.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmlab.data.rows import pad_rows, tokenize_example
from llmlab.errors import ConfigError
from llmlab.evaluation.metrics import final_answer, normalize_answer
from llmlab.stages import alignment
from llmlab.stages.reward import sequence_scores


def _import(path: str, setting: str, example: str):
    """`module:function` or `module.function` -> the callable; ConfigError naming the setting otherwise."""
    mod, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except Exception as err:  # noqa: BLE001 - anything a user's module raises on import
        raise ConfigError(f"{setting}={path}: cannot import it ({type(err).__name__}: {err}); give {example}") from None
    if not callable(fn):
        raise ConfigError(f"{setting}={path} is not a function; give {example}")
    return fn


class TaskReward:
    """The built-in tasks' checkable reward `fn(completion, answer) -> float` per completion (default:
    llmlab.data.builtin.rule_reward: 1 for an exact answer, else 0.9 x the share of matching positions).
    `exact=true`: 1/0 exact match only (validation's exact match: `normalize_answer`). Needs the data's reference
    answers (`data.answer_field`). Both judge the final answer: a thinking model's leading <think> block is
    removed first (`evaluation.metrics`), as validation's exact match does, so grpo on Qwen 3 rewards answers,
    not reasoning that happens to end like one."""

    def __init__(self, fn: str = "llmlab.data.builtin.rule_reward", exact: bool = False,
                 setting: str = "reward.task.fn"):
        self.name, self.exact = fn, exact
        self.fn = _import(fn, setting, "the dotted path of a function(response, answer) -> float, "
                                       "e.g. llmlab.data.builtin.rule_reward")
        self.setting = setting

    def __call__(self, prompts, completions, answer=None, **fields) -> list[float]:
        if answer is None or any(a is None for a in answer):
            raise ConfigError(f"{self.setting}={self.name} needs a reference answer per prompt "
                              f"(data.answer_field); use a reward model for data without answers")
        if self.exact:
            return [float(normalize_answer(c) == a.strip()) for c, a in zip(completions, answer)]
        return [float(self.fn(final_answer(c), a)) for c, a in zip(completions, answer)]


class FormatReward:
    """1.0 when the completion (surrounding whitespace removed) matches `pattern` (re.fullmatch, or
    re.search with `search=true`), else 0.0: rewards the shape of an answer, not its content."""

    def __init__(self, pattern: str, search: bool = False):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ConfigError(f"reward.format.pattern={pattern!r}: not a regular expression ({err})") from None
        self.search = search

    def __call__(self, prompts, completions, **fields) -> list[float]:
        match = self.regex.search if self.search else self.regex.fullmatch
        return [float(match(c.strip()) is not None) for c in completions]


class LengthPenalty:
    """-(length - target) / target for completions longer than `target`, else 0 (never positive).
    Length in tokens (`completion_tokens` from the stage) or, without them, characters."""

    def __init__(self, target: int = 16):
        if target < 1:
            raise ConfigError(f"reward.length.target={target}: give a length >= 1")
        self.target = target

    def __call__(self, prompts, completions, completion_tokens=None, **fields) -> list[float]:
        lengths = completion_tokens if completion_tokens is not None else [len(c) for c in completions]
        return [-max(0.0, float(n) - self.target) / self.target for n in lengths]


def gold_answer(text: str) -> str:
    """GSM8K-style references end with `#### <number>`: the part after the last `####`, else the text."""
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else text.strip()


class MathVerifyReward:
    """1.0 when the completion's final answer equals the reference mathematically (math-verify's
    parse + verify: 0.5 == 1/2, \\frac{1}{2}, ...), else 0.0. References in GSM8K's `... #### 42` form are
    cut to what follows `####`."""

    def __init__(self, answer_field: str = "answer"):
        try:
            import math_verify
        except ImportError:
            raise ConfigError("reward.math: needs the math-verify package (pip install 'llmlab[eval]')") from None
        self.parse, self.verify, self.answer_field = math_verify.parse, math_verify.verify, answer_field

    def __call__(self, prompts, completions, **fields) -> list[float]:
        answers = fields.get(self.answer_field)
        if answers is None:
            raise ConfigError(f"reward.math.answer_field={self.answer_field}: the records have no such field "
                              f"(fields: {sorted(fields)})")
        out = []
        for completion, answer in zip(completions, answers):
            gold = self.parse(gold_answer(str(answer)))
            try:
                out.append(float(bool(gold) and self.verify(gold, self.parse(completion))))
            except Exception:  # noqa: BLE001 - math-verify raises on malformed LaTeX; unparseable = wrong
                out.append(0.0)
        return out


class UserReward:
    """Any function given as `module:function` with the signature
    `(prompts, completions, **fields) -> list[float]` (fields: answer, completion_tokens, truncated, ...)."""

    def __init__(self, fn: str):
        self.name = fn
        self.fn = _import(fn, "reward.user.fn", "module:function with signature "
                                                "(prompts, completions, **fields) -> list[float]")

    def __call__(self, prompts, completions, **fields):
        return self.fn(prompts, completions, **fields)


class ModelReward:
    """Scores of a trained reward model (a sequence classifier) on prompt + completion, from a run dir
    (its hf/) or an HF path. Text goes through the reward model's own tokenizer (it may differ from
    the policy's, e.g. DeBERTa scoring OPT), built as stage=rm built its rows: prompt, response, EOS."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512):
        source = alignment.hf_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = alignment.freeze(AutoModelForSequenceClassification.from_pretrained(source))
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def to(self, device):
        self.model.to(device)
        return self

    def _row(self, prompt: str, response: str) -> dict:
        row = tokenize_example(self.tokenizer, prompt, response, self.max_length)
        if row is None:  # the response alone is too long: keep its end
            ids = (self.tokenizer(response, add_special_tokens=False)["input_ids"]
                   + [self.tokenizer.eos_token_id])[-self.max_length:]
            row = {"input_ids": ids, "labels": ids}
        return row

    @torch.no_grad()
    def __call__(self, prompts, completions, **fields) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            rows = [self._row(p, r) for p, r in zip(prompts[i:i + self.batch_size], completions[i:i + self.batch_size])]
            batch = {k: v.to(device) for k, v in pad_rows(rows, self.tokenizer.pad_token_id).items()}
            scores.append(sequence_scores(self.model, batch).cpu())
        return torch.cat(scores)


class RuleReward(TaskReward):
    """ppo's `stage.rule_reward=<fn>` shortcut: the task reward under that setting's name."""

    def __init__(self, fn: str = "llmlab.data.builtin.rule_reward"):
        super().__init__(fn, setting="stage.rule_reward")


class Rewards:
    """Named reward functions with weights: `__call__` -> (total (N,), {name: (N,)}). Each function's
    output is checked: one finite-or-not number per completion, else a ConfigError naming `reward.<name>`."""

    def __init__(self, functions: dict, weights: dict[str, float] | None = None):
        self.functions = dict(functions)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.functions}

    def to(self, device):
        for fn in self.functions.values():
            if hasattr(fn, "to"):
                fn.to(device)
        return self

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> tuple[torch.Tensor, dict]:
        per_function, total = {}, torch.zeros(len(completions))
        for name, fn in self.functions.items():
            try:
                out = fn(prompts, completions, **fields)
            except TypeError as err:  # a signature that does not take (prompts, completions, **fields)
                raise ConfigError(f"reward.{name}: calling it failed ({err}); a reward takes (prompts, completions, "
                                  f"**fields) with fields {sorted(fields)}") from None
            values = check_rewards(out, len(completions), name)
            per_function[name] = values
            total = total + self.weights[name] * values
        return total, per_function


def check_rewards(values, n: int, name: str) -> torch.Tensor:
    """A reward function's return value as a float tensor (n,), or a one-line error naming it."""
    if torch.is_tensor(values):
        values = values.detach().float().cpu().reshape(-1).tolist()
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ConfigError(f"reward.{name}: returned {type(values).__name__}, not a list of {n} numbers (one per "
                          f"completion)")
    if len(values) != n:
        raise ConfigError(f"reward.{name}: returned {len(values)} values for {n} completions; return one number "
                          f"per completion")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v))]
    if bad:
        raise ConfigError(f"reward.{name}: returned non-numeric reward {bad[0]!r}; return floats (no None/NaN)")
    return torch.tensor([float(v) for v in values])


def build_rewards(group, required: bool = True) -> Rewards | None:
    """The `reward` config group ({name: {_target_, weight, ...}}) -> Rewards; a target that cannot be
    built is a ConfigError naming `reward.<name>`. In a stage's config it is a node with
    `_recursive_: false` (Hydra must not build the entries itself: `weight` is not their argument)."""
    if isinstance(group, DictConfig):
        missing = sorted(OmegaConf.missing_keys(group))
        if missing:
            key = missing[0] if missing[0].startswith("reward.") else f"reward.{missing[0]}"
            raise ConfigError(f"{key}: has no value (???); set it, e.g. {key}=<value>")
        group = OmegaConf.to_container(group, resolve=True)
    if not group:
        if not required:
            return None
        raise ConfigError("reward: no reward function selected; e.g. reward=task or 'reward=[task,format]'")
    functions, weights = {}, {}
    for name, node in group.items():
        node = dict(node)
        if callable(node.get("_target_")) or not isinstance(node.get("_target_"), str):
            raise ConfigError(f"reward.{name}: needs a _target_ (a reward class or function path)")
        weights[name] = float(node.pop("weight", 1.0))
        try:
            functions[name] = instantiate(node)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - Hydra wraps import/constructor errors
            cause = err.__cause__ or err
            if isinstance(cause, ConfigError):
                raise cause from None
            raise ConfigError(f"reward.{name}._target_={node['_target_']}: cannot build it "
                              f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
    return Rewards(functions, weights)
