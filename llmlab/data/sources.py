"""Where records come from: the built-in generator, local files, or a hub dataset.

A source yields plain dicts; which fields matter is decided later by the stage's format
(`llmlab/data/formats.py`). `kind` tells the built-in generator which shape to produce.
"""
from __future__ import annotations

import math
from pathlib import Path

from llmlab.data import builtin
from llmlab.errors import DataError
from llmlab.nodes import to_plain

BUILTIN_KINDS = {
    "lm": builtin.pretrain_documents,
    "sft": builtin.sft_examples,
    "preference": builtin.preference_pairs,
    "unpaired": builtin.unpaired_examples,  # stage=kto: n pairs -> 2n labelled examples
    "prompt": builtin.ppo_prompts,
}
FILE_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _as_list(files) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def check_files(files, setting: str) -> list[Path]:
    paths = [Path(f).expanduser() for f in _as_list(files)]
    if not paths:
        raise DataError(f"{setting} is empty: give one or more local files, e.g. {setting}=/path/train.jsonl")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{setting}: file not found: {p}; give existing local files ({', '.join(sorted(FILE_TYPES))})")
        if p.stat().st_size == 0:
            raise DataError(f"{setting}: {p} is empty; give a file with data")
        if p.suffix.lower() not in FILE_TYPES:
            raise DataError(f"{setting}: unsupported file type {p.suffix!r} ({p}); use one of {sorted(FILE_TYPES)}")
    if len({FILE_TYPES[p.suffix.lower()] for p in paths}) > 1:
        raise DataError(f"{setting}: mix of file types {[p.suffix for p in paths]}; use one type per split")
    return paths


SAMPLE_BY = ("document", "paragraph", "line")


def load_files(paths: list[Path], setting: str, sample_by: str | None = "document"):
    """The records of local files (a `datasets.Dataset`). A .txt file gives one record per `sample_by` unit:
    the whole file (document), text between blank lines (paragraph) or each line (line), as `datasets`' own
    text builder cuts it."""
    # lazy (datasets, here and below): llmlab.checks imports this module (check_files) before torch loads
    from datasets import load_dataset

    kind = FILE_TYPES[paths[0].suffix.lower()]
    extra = {"sample_by": sample_by or "document"} if kind == "text" else {}
    try:
        return load_dataset(kind, data_files=[str(p) for p in paths], split="train", **extra)
    except Exception as err:  # datasets wraps parse errors in long chains: give one line naming the files
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, UnicodeDecodeError):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{setting}: {[str(p) for p in paths]} is not UTF-8 text (byte {cause.object[cause.start]:#04x} "
                            f"at offset {cause.start} of a read chunk); convert it (e.g. iconv -f latin1 -t utf-8 "
                            f"FILE > FILE.utf8) and point {setting} at the UTF-8 copy") from None
        cause = err.__cause__ or err
        raise DataError(f"{setting}: cannot read {[str(p) for p in paths]}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def load_split(cfg, kind: str, split: str, seed: int):
    """Records of one split ('train' or 'validation'): a list, a `datasets.Dataset`, or (streaming) an
    `IterableDataset`."""
    source = cfg.source
    sample_by = cfg.get("sample_by")
    # the split's shuffle: data.seed when the data group has one (runs of a seed sweep then share one validation
    # set and one prepared corpus), else the run's seed
    seed = cfg.get("seed", seed) if source != "builtin" else seed
    if source == "builtin":
        n = cfg.n_train if split == "train" else cfg.n_val
        return BUILTIN_KINDS[kind](n, split=split, seed=cfg.get("seed", 0))
    if source == "text":
        if split == "train" or cfg.get("val_files"):
            setting = "data.train_files" if split == "train" else "data.val_files"
            ds = load_files(check_files(cfg.train_files if split == "train" else cfg.val_files, setting), setting,
                            sample_by)
            return ds if cfg.get("val_files") or not cfg.val_fraction else _split(ds, cfg.val_fraction, seed, split,
                                                                                 "data.train_files", sample_by)
        files = check_files(cfg.train_files, "data.train_files")
        return _split(load_files(files, "data.train_files", sample_by), cfg.val_fraction, seed, split,
                      "data.train_files", sample_by)
    if source == "hub":
        from datasets import load_dataset  # lazy: see load_files

        hub_split = cfg.split if split == "train" else (cfg.get("val_split") or cfg.split)
        # data.data_files: a hub dataset's own files, or local ones read by a packaged builder
        # (data.name=json|parquet|text|csv): how the streaming path is tested offline
        ds = load_dataset(cfg.name, cfg.get("config_name"), split=hub_split, streaming=bool(cfg.streaming),
                          revision=cfg.get("revision"), data_files=to_plain(cfg.get("data_files")))
        if cfg.get("val_split"):
            return ds
        if cfg.streaming:  # no random split of a stream: hold out its first n_val records instead
            return ds.take(cfg.n_val) if split != "train" else ds.skip(cfg.n_val)
        return _split(ds, cfg.val_fraction, seed, split, f"data.name={cfg.name}")
    raise DataError(f"data.source={source!r} is unknown; use builtin, text or hub")


def _split(ds, val_fraction: float, seed: int, split: str, setting: str = "the data", sample_by=None):
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1) when no validation files are given")
    n = len(ds)
    # datasets' train_test_split rounds the held-out count up and needs one record left on each side
    if n < 2 or math.ceil(n * val_fraction) >= n:
        unit = {"document": " (sample_by=document: one per .txt file)", "paragraph": " (one per paragraph)",
                "line": " (one per line)"}.get(sample_by, "")
        raise DataError(f"{setting} has {n} record(s){unit}: too few to hold out data.val_fraction={val_fraction} "
                        f"for validation; give data.val_files, or set data.holdout=tail (the last {val_fraction:g} of "
                        f"the tokens){', or data.sample_by=paragraph' if sample_by == 'document' else ''}")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return parts["train"] if split == "train" else parts["test"]
