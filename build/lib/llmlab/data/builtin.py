"""Built-in synthetic data: one deterministic generator that serves every stage.

The "world" is a handful of string tasks over a small alphabet (reverse, sort, ...). Each task
instance is a (task, letters) pair with one correct answer, so generations can be checked exactly
and rewards computed by rule. The same instances appear in four shapes:

- pretraining text: documents of prose statements ("the reverse of cabd is dbac."),
- SFT pairs: {"prompt": "reverse cabd", "response": "dbac"},
- preference pairs: the correct answer (chosen) vs a plausible wrong one (rejected),
- unpaired (KTO) examples: each pair's answers as two labelled examples (chosen: true, rejected: false),
- PPO prompts with a rule reward (`rule_reward`).

Held-out instances never appear in any training split of any stage: an instance is held out when a
stable hash of its letters falls in the validation bucket. So "exact match on held-out instances"
measures generalisation, not memorisation. Everything is a pure function of (seed, split, index).
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

ALPHABET = "abcdefgh"
MIN_LEN, MAX_LEN = 3, 6
VAL_BUCKETS = 10  # 1 in 10 letter strings is held out

TASKS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "copy": lambda s: s,
    "shift": lambda s: "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in s),
}
# Prose forms used in the pretraining corpus; SFT uses the instruction form "<task> <letters>".
STATEMENTS = {
    "reverse": "the reverse of {x} is {y}.",
    "sort": "{x} sorted is {y}.",
    "copy": "{x} copied is {y}.",
    "shift": "{x} shifted by one is {y}.",
}


def is_held_out(letters: str) -> bool:
    return int(hashlib.md5(letters.encode()).hexdigest(), 16) % VAL_BUCKETS == 0


def _letters(rng: random.Random, split: str) -> str:
    want_val = split != "train"
    while True:
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if is_held_out(s) == want_val:
            return s


def _rng(seed: int, split: str, stream: str) -> random.Random:
    return random.Random(f"{seed}/{split}/{stream}")


def instance(rng: random.Random, split: str) -> tuple[str, str, str]:
    task = rng.choice(sorted(TASKS))
    x = _letters(rng, split)
    return task, x, TASKS[task](x)


def pretrain_documents(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """Documents of 4-10 statements each, e.g. "the reverse of cab is bac. abc sorted is abc."."""
    rng = _rng(seed, split, "pretrain")
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(4, 10)):
            task, x, y = instance(rng, split)
            parts.append(STATEMENTS[task].format(x=x, y=y))
        docs.append({"text": " ".join(parts)})
    return docs


def _prompts_with(answer_key: str, n: int, split: str, seed: int, purpose: str) -> list[dict]:
    """n instances as {prompt, <answer_key>: answer}, from the RNG stream of `purpose`."""
    rng = _rng(seed, split, purpose)
    out = []
    for _ in range(n):
        task, x, y = instance(rng, split)
        out.append({"prompt": f"{task} {x}", answer_key: y})
    return out


def sft_examples(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    return _prompts_with("response", n, split, seed, "sft")


def _wrong_answer(rng: random.Random, task: str, x: str, y: str) -> str:
    """A plausible wrong answer: another task's answer, one letter changed, or a truncation."""
    for _ in range(20):
        kind = rng.randrange(3)
        if kind == 0:
            other = rng.choice([t for t in TASKS if t != task])
            cand = TASKS[other](x)
        elif kind == 1:
            i = rng.randrange(len(y))
            cand = y[:i] + rng.choice([c for c in ALPHABET if c != y[i]]) + y[i + 1:]
        else:
            cand = y[: rng.randint(1, len(y) - 1)]
        if cand != y:
            return cand
    return y[::-1] + "a"


def preference_pairs(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    rng = _rng(seed, split, "preference")
    out = []
    for _ in range(n):
        task, x, y = instance(rng, split)
        out.append({"prompt": f"{task} {x}", "chosen": y, "rejected": _wrong_answer(rng, task, x, y)})
    return out


def unpaired_examples(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """KTO's unpaired examples from the first n preference pairs (the same instances stage=dpo sees):
    2n records, {prompt, completion: chosen, label: True} and {prompt, completion: rejected, label: False}."""
    return [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in preference_pairs(n, split, seed) for key in ("chosen", "rejected")]


def ppo_prompts(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """Prompts with their reference answer; `rule_reward` scores a generation against it."""
    return _prompts_with("answer", n, split, seed, "ppo")


def rule_reward(response: str, answer: str) -> float:
    """Checkable reward in [0, 1]: per-position character agreement, penalised for wrong length.

    1.0 exactly when response == answer; dense enough for PPO to climb.
    """
    response = response.strip()
    if response == answer:
        return 1.0
    hits = sum(a == b for a, b in zip(response, answer))
    return 0.9 * hits / max(len(answer), len(response), 1)
