"""Datasets and result helpers for llmlab's own lm-eval task YAMLs (referenced as `!function utils.x`).

lm-eval calls a task's `custom_dataset` with the TaskManager's metadata (llmlab passes `data_dir`, where
llmlab.evaluation.harness.write_builtin_data wrote the jsonl files, and `text_file` for perplexity).
"""
from __future__ import annotations

import json
import re
from pathlib import Path


def _jsonl(path: Path):
    # lazy (datasets, here and below): evaluation.harness imports this module, and llmlab.checks imports
    # that one before torch loads
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()])})


def builtin_mc(data_dir: str | None = None, **_):
    return _jsonl(Path(data_dir) / "llmlab_builtin_mc.jsonl")


def builtin_em(data_dir: str | None = None, **_):
    return _jsonl(Path(data_dir) / "llmlab_builtin_em.jsonl")


def read_documents(text_file: str) -> list[str]:
    """A .jsonl's `text` fields, or a text file split at blank lines (empty documents dropped)."""
    path = Path(text_file)
    if path.suffix == ".jsonl":
        docs = [json.loads(line).get("text", "") for line in path.read_text().splitlines() if line.strip()]
    else:
        docs = re.split(r"\n\s*\n", path.read_text())
    return [d.strip() for d in docs if d and d.strip()]


def text_documents(text_file: str | None = None, **_):
    import datasets  # lazy: see _jsonl

    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in read_documents(text_file)])})


def perplexity_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
