"""Prepared corpora (llmlab/data/corpus.py): tokenized once into token files, read by offset.

The blocks a prepared corpus gives equal the in-memory path's (`packing.pack` of the same records); the cache is
keyed (another tokenizer or setting is another corpus), rebuilt when damaged, shared by ranks; runs on it resume
exactly; memory does not grow with the corpus; a user's bad data gets one line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from llmlab.data.corpus import TokenBlocks, encode_document, holdout_of, lm_splits, tokenizer_fingerprint
from llmlab.data.datamodule import FeistelPermutation, ResumableSampler
from llmlab.data.packing import pack
from llmlab.data.sources import load_split
from llmlab.data.tokenizer import builtin_tokenizer
from llmlab.errors import DataError
from tests.conftest import assert_ok, run_module
from tests.families import SHAKESPEARE, family_tokenizer

TEXT = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else ("First Citizen:\nSpeak, speak.\n\n" * 4000)


def data_cfg(tmp_path, files, **over):
    base = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "text.yaml")
    base.train_files = [str(f) for f in files]
    base.cache_dir = str(tmp_path / "cache")
    for k, v in over.items():
        OmegaConf.update(base, k, v, force_add=True)
    return base


def write_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n documents of varied length (1 to ~3,000 characters) cut from the text."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = int(rng.integers(0, len(TEXT) - 4000))
            f.write(json.dumps({"text": TEXT[a:a + int(rng.integers(1, 3000))]}) + "\n")
    return path


def packed_blocks(cfg, tokenizer, split: str) -> list[dict]:
    """Today's in-memory path: the split's records, tokenized and packed (formats.LMFormat)."""
    records = load_split(cfg, "lm", split, 0)
    ids = tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
    return list(pack(ids, cfg.block_size, tokenizer.eos_token_id))


@pytest.mark.parametrize("tokenizer_kind", ["builtin", "bpe"])
def test_prepared_blocks_equal_packed_blocks(tmp_path, tokenizer_kind):
    tok = builtin_tokenizer() if tokenizer_kind == "builtin" else family_tokenizer("llama3")
    cfg = data_cfg(tmp_path, [write_jsonl(tmp_path / "docs.jsonl", 400)], block_size=96, holdout="random")
    train, val = lm_splits(cfg, tok, 96, seed=0)
    for blocks, split in ((train, "train"), (val, "validation")):
        ref = packed_blocks(cfg, tok, split)
        assert len(blocks) == len(ref) > 3
        for i in range(len(ref)):
            got = blocks[i]
            for k in ("input_ids", "segment_ids", "position_ids"):
                assert torch.equal(got[k], ref[i][k]), (split, i, k)
    assert train.dtype == np.uint16 and (Path(train.path) / "tokens.bin").stat().st_size == 2 * train.n_tokens


def test_long_document_pieces_tokenize_as_the_whole(tmp_path):
    tok = family_tokenizer("llama3")
    text = TEXT[:60_000]
    assert encode_document(tok, text, chunk_chars=2_000) == tok(text, add_special_tokens=False)["input_ids"]


def test_cache_is_reused_and_keyed(tmp_path, caplog):
    files = [write_jsonl(tmp_path / "docs.jsonl", 200)]
    cfg = data_cfg(tmp_path, files, block_size=64)
    a, _ = lm_splits(cfg, builtin_tokenizer(), 64, seed=0)
    mtime = (a.path / "tokens.bin").stat().st_mtime_ns
    b, _ = lm_splits(cfg, builtin_tokenizer(), 32, seed=0)  # the block size is not in the key: the same tokens
    assert b.path == a.path and (b.path / "tokens.bin").stat().st_mtime_ns == mtime
    # another tokenizer, another seed of the split, a rewritten file: each is another corpus, and the log says why
    bpe = family_tokenizer("llama3")
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(builtin_tokenizer())
    with caplog.at_level("INFO", logger="llmlab"):
        c, _ = lm_splits(cfg, bpe, 64, seed=0)
    assert c.path != a.path and c.n_tokens < a.n_tokens and "the tokenizer changed" in caplog.text
    d, _ = lm_splits(data_cfg(tmp_path, files, block_size=64, seed=1), builtin_tokenizer(), 64, seed=0)
    assert d.path != a.path
    write_jsonl(files[0], 200, seed=5)
    e, _ = lm_splits(cfg, builtin_tokenizer(), 64, seed=0)
    assert e.path != a.path and not torch.equal(e[0]["input_ids"], a[0]["input_ids"])


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "leftover_tmp"])
def test_damaged_or_partial_cache_is_rebuilt(tmp_path, caplog, damage):
    cfg = data_cfg(tmp_path, [write_jsonl(tmp_path / "docs.jsonl", 200)], block_size=64)
    train, _ = lm_splits(cfg, builtin_tokenizer(), 64, seed=0)
    first = [train[i]["input_ids"] for i in range(len(train))]
    if damage == "truncate":  # a copy cut mid-write
        with open(train.path / "tokens.bin", "r+b") as f:
            f.truncate(train.n_tokens)
    elif damage == "no_meta":  # a build killed before its last file (renamed in by hand, say)
        (train.path / "meta.json").unlink()
    else:  # a build killed mid-way leaves only a temporary directory: never read
        os.rename(train.path, train.path.with_name(train.path.name + ".tmp-host-1"))
    with caplog.at_level("INFO", logger="llmlab"):
        again, _ = lm_splits(cfg, builtin_tokenizer(), 64, seed=0)
    if damage != "leftover_tmp":
        assert "cannot be trusted" in caplog.text
    assert len(again) == len(first) and all(torch.equal(again[i]["input_ids"], x) for i, x in enumerate(first))


def test_txt_sample_by_and_tail_holdout(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT[:50_000])
    tok = builtin_tokenizer()
    cfg = data_cfg(tmp_path, [book], block_size=64)
    assert holdout_of(cfg) == "tail"  # one book: the last tokens are held out, as nanoGPT's shakespeare split
    train, val = lm_splits(cfg, tok, 64, seed=0)
    assert train.n_docs == 1 and train.n_tokens + val.n_tokens == len(TEXT[:50_000].encode()) + 1  # one EOS
    assert val.n_tokens == pytest.approx(0.05 * train.n_tokens / 0.95, abs=2)
    # validation starts where train's tokens end (train's last partial block is dropped): disjoint, in order
    data, cut = TEXT[:50_000].encode(), train.end
    assert len(train) * 64 <= cut == val.start
    assert tok.decode(val[0]["input_ids"].tolist()) == data[cut:cut + 64].decode()
    assert tok.decode(train[len(train) - 1]["input_ids"].tolist()) == data[(len(train) - 1) * 64:len(train) * 64].decode()
    paragraphs = lm_splits(data_cfg(tmp_path, [book], block_size=64, sample_by="paragraph", holdout="random"), tok, 64,
                           seed=0)[0]
    lines = lm_splits(data_cfg(tmp_path, [book], block_size=64, sample_by="line", holdout="random"), tok, 64, seed=0)[0]
    assert 1 < paragraphs.n_docs < lines.n_docs


def test_ranks_shards_disjoint_and_covering_and_large_orders_need_no_tensor(tmp_path, monkeypatch):
    cfg = data_cfg(tmp_path, [write_jsonl(tmp_path / "docs.jsonl", 300)], block_size=32)
    train, _ = lm_splits(cfg, builtin_tokenizer(), 32, seed=0)
    n = len(train)
    import llmlab.data.datamodule as dm

    for limit in (dm.PERMUTATION_IN_MEMORY, 16):  # randperm, and the Feistel permutation beyond the limit
        monkeypatch.setattr(dm, "PERMUTATION_IN_MEMORY", limit)
        shards = [list(ResumableSampler(n, seed=3, rank=r, world_size=2, length=n // 2)) for r in (0, 1)]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 2 * (n // 2)
    perm = FeistelPermutation(100_003, seed=1)
    values = [perm[i] for i in range(100_003)]
    assert sorted(values) == list(range(100_003)) and values[:5] != list(range(5))


def test_bad_data_gets_one_line(tmp_path):
    tok = builtin_tokenizer()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "only one record"}) + "\n")
    with pytest.raises(DataError, match=r"has 1 record\(s\).*data.val_files.*data.holdout=tail"):
        lm_splits(data_cfg(tmp_path, [one], block_size=8), tok, 8, seed=0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    with pytest.raises(DataError, match=r"not UTF-8 text.*iconv"):
        lm_splits(data_cfg(tmp_path, [latin], block_size=8), tok, 8, seed=0)
    small = tmp_path / "small.txt"
    small.write_text("a few words\n")
    with pytest.raises(DataError, match=r"no complete block of data.block_size=64"):
        lm_splits(data_cfg(tmp_path, [small], block_size=64), tok, 64, seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"data.cache_dir=.* cannot be written"):
        lm_splits(data_cfg(tmp_path, [small], block_size=4, cache_dir=str(blocker / "sub")), tok, 4, seed=0)


def _env(tmp_path) -> dict:
    return {"LLMLAB_CACHE": str(tmp_path / "llmlab-cache"), "OMP_NUM_THREADS": "1"}


RUN = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
       "trainer.enable_progress_bar=false", "data.batch_size=4", "data.block_size=64"]


@pytest.mark.slow  # two CLI processes (~10 s each)
def test_prepare_cli_then_run_reads_it(tmp_path):
    """`llmlab.prepare` with a run's overrides prepares what that run reads; the run tokenizes nothing."""
    book = tmp_path / "book.txt"
    book.write_text(TEXT[:40_000])
    args = ["data=text", f"data.train_files=[{book}]"]
    proc = run_module("llmlab.prepare", *args, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "tokenizing" in proc.stderr and proc.stdout.count("tokens (2 bytes each)") == 2
    bad = run_module("llmlab.prepare", "data=text", f"data.train_files=[{tmp_path / 'nope.txt'}]", env=_env(tmp_path))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("llmlab: error: data.train_files")


@pytest.mark.slow  # three short training runs
def test_default_model_trains_on_text_and_resumes_exactly(tmp_path):
    """`data=text` on the default model as it is (block size from the model), a prepared corpus read by offset:
    stop at 3 + resume = the uninterrupted run, and the second run reads the cache (tokenizes nothing)."""
    corpus = write_jsonl(tmp_path / "docs.jsonl", 600)
    args = ["data=text", f"data.train_files=[{corpus}]", *RUN]
    from tests.conftest import run_cli

    plain = run_cli(tmp_path / "plain", *args, env=_env(tmp_path))
    assert_ok(plain)
    part = run_cli(tmp_path / "part", *args, "stop_at_step=3", env=_env(tmp_path))
    assert_ok(part)
    assert "tokenizing" not in part.stderr  # the first run's corpus, read as it is
    resumed = run_cli(tmp_path / "part", *args, "resume=auto", env=_env(tmp_path))
    assert_ok(resumed)
    ref = dict(json.loads((plain.dir / "history.json").read_text())["train/loss"])
    got = dict(json.loads((part.dir / "history.json").read_text())["train/loss"])
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]
    for step in range(4, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    default = run_cli(tmp_path / "default_block", "data=text", f"data.train_files=[{corpus}]",
                      *[a for a in RUN if not a.startswith("data.block_size")], env=_env(tmp_path))
    assert_ok(default)  # block size: the tiny model's 256 positions (the data group's 512 was refused before)
    assert OmegaConf.load(default.dir / "config_resolved.yaml").data.block_size == 256


@pytest.mark.slow  # four short runs on corpora of 1 and 16 MB
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """The same run on a corpus 16x larger: peak RSS within 60 MB (bench/RESULTS.md has 6 MB vs 2 GB)."""
    from tests.conftest import run_cli

    rss = {}
    for mb in (1, 16):
        corpus = tmp_path / f"c{mb}.jsonl"
        with open(corpus, "w") as f:
            written = 0
            while written < mb << 20:
                line = json.dumps({"text": TEXT[written % 500_000:written % 500_000 + 2000]}) + "\n"
                f.write(line)
                written += len(line)
        args = ["data=text", f"data.train_files=[{corpus}]", *RUN]
        assert_ok(run_cli(tmp_path / f"prep{mb}", *args, "trainer.max_steps=1", env=_env(tmp_path)))  # prepares
        run = run_cli(tmp_path / f"run{mb}", *args, env=_env(tmp_path))
        assert_ok(run)
        rss[mb] = run.summary["peak_rss_mb"]
    assert rss[16] - rss[1] < 60, rss


def _same(a, b) -> bool:
    """Equal, tensors compared by value (dtype and shape included), containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["sft", "chat", "preference"])
def test_other_stages_examples_are_cached_and_equal(tmp_path, kind):
    """SFT (prompt/response and conversations through the family's chat template) and preference examples:
    tokenized once, read back equal to a fresh build; the second time nothing is tokenized."""
    from llmlab.data.corpus import cached_examples
    from llmlab.data.formats import FORMATS

    rows = []
    for i in range(40):
        q, a, b = TEXT[i * 90:i * 90 + 40], TEXT[i * 90 + 40:i * 90 + 90], TEXT[i * 90 + 5:i * 90 + 30]
        rows.append({"sft": {"prompt": q, "response": a},
                     "chat": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                     "preference": {"prompt": q, "chosen": a, "rejected": b}}[kind])
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt_name = "preference" if kind == "preference" else "sft"
    tok = family_tokenizer("qwen2_5") if kind == "chat" else builtin_tokenizer()
    cfg = data_cfg(tmp_path, [path], block_size=128, holdout="random")
    args = {"block_size": 128, "prompt_template": cfg.prompt_template, "record_format": "auto"}
    fmt = FORMATS[fmt_name](tokenizer=tok, **args)
    calls = []

    def build(records, split):
        calls.append(split)
        return fmt.build(records, split)

    for split in ("train", "validation"):
        first = cached_examples(cfg, fmt_name, args, tok, split, 0, lambda r, s=split: build(r, s))
        again = cached_examples(cfg, fmt_name, args, tok, split, 0, lambda r, s=split: build(r, s))
        fresh = fmt.build(load_split(cfg, fmt_name, split, 0), split)
        assert _same(first, fresh) and _same(again, fresh) and len(fresh) > 1
    assert calls == ["train", "validation"]  # each split tokenized once
    other = cached_examples(cfg, fmt_name, {**args, "block_size": 64}, tok, "train", 0, lambda r: build(r, "train"))
    assert calls[-1] == "train" and len(calls) == 3 and not _same(other, fresh)  # another setting: tokenized again
