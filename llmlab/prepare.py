"""`python -m llmlab.prepare [the run's overrides]`: tokenize a run's pretraining data once, ahead of the run.

    python -m llmlab.prepare data=text data.train_files=[corpus/*.jsonl] model=gpt2 data.num_proc=8

Takes the same overrides as `llmlab.run` and writes the prepared corpora (llmlab/data/corpus.py: token files +
document starts under data.cache_dir) that the run with those overrides reads; a run also prepares them on first
use, so this is for doing it before a job (one Slurm job prepares, the training jobs start at once) or to see the
numbers. Prints each split's directory, tokens, documents and blocks. Nothing is written into a run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

from llmlab.errors import ConfigError, fail, is_user_error

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_run_config(overrides: list[str]):
    """The run's config as `llmlab.run` composes it (Hydra's compose API: no run directory is made)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from llmlab.models.bases import ensure_base

    # the resolvers llmlab.run registers (an entry point: not imported here)
    if not OmegaConf.has_resolver("llmlab_base"):
        OmegaConf.register_new_resolver("llmlab_base", ensure_base, use_cache=True)
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("train", overrides=overrides)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def prepare(overrides: list[str]) -> list[dict]:
    """Prepare the pretraining splits of the run `overrides` describe; returns one row per split."""
    from llmlab.checks.data import check_data_settings, fill_block_size

    cfg = compose_run_config(overrides)
    if cfg.stage.name != "pretrain":
        raise ConfigError(f"llmlab.prepare tokenizes pretraining text (stage=pretrain); stage={cfg.stage.name} "
                          f"reads its examples at the run's start (they are small next to a pretraining corpus)")
    if cfg.data.source not in ("text", "hub") or cfg.data.get("streaming"):
        raise ConfigError(f"data.source={cfg.data.source}{' streaming' if cfg.data.get('streaming') else ''} is "
                          f"not prepared ahead (built-in data is generated, a stream is tokenized as it is read); "
                          f"use data=text or data=hub with data.streaming=false")
    fill_block_size(cfg)
    check_data_settings(cfg)
    from llmlab.data.corpus import lm_splits
    from llmlab.models.build import build_tokenizer

    tokenizer = build_tokenizer(cfg.model)
    rows = []
    for split, blocks in zip(("train", "validation"), lm_splits(cfg.data, tokenizer, cfg.data.block_size, cfg.seed)):
        rows.append({"split": split, "path": str(blocks.path), "tokens": blocks.n_tokens, "documents": blocks.n_docs,
                     "blocks": len(blocks), "block_size": blocks.block_size,
                     "bytes_per_token": blocks.dtype.itemsize})
    return rows


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    from llmlab.console import quiet_libraries

    quiet_libraries()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        rows = prepare(argv)
    except Exception as err:  # noqa: BLE001 - a user's input: one line, exit 2
        if is_user_error(err):
            fail(err)
        raise
    for r in rows:
        print(f"{r['split']:<10} {r['path']}  {r['tokens']:,} tokens ({r['bytes_per_token']} bytes each), "
              f"{r['documents']:,} documents, {r['blocks']:,} blocks of {r['block_size']}")


if __name__ == "__main__":
    main(sys.argv[1:])
