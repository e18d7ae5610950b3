"""`data=hub data.streaming=true` (corpora larger than memory) through the real CLI, on local files.

The hub path reads with `datasets.load_dataset(name, data_files=..., streaming=True)`; with
`data.name=json` and `data.data_files=<local .jsonl>` the same code runs offline. The memory side
(peak RSS flat as the corpus grows 10x) is measured by bench/streaming_memory.py (bench/RESULTS.md).
"""
from __future__ import annotations

import pytest
import json
from pathlib import Path

import lightning as L

from tests.conftest import assert_ok

N_VAL, BLOCK, BATCH = 16, 64, 4


class RecordBatches(L.Callback):
    """Appends every training batch's rows (token ids) to a JSON-lines file: what the run trained on."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": batch["input_ids"].tolist()}) + "\n")


def write_corpus(path: Path, n_docs: int) -> Path:
    """Documents that differ from each other (a number and a letter pattern), so every block is unique."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w") as f:
        for i in range(n_docs):
            body = " ".join(letters[(i * 7 + j) % 26] * (1 + (i + j) % 5) for j in range(12))
            f.write(json.dumps({"text": f"document {i:06d}: {body}."}) + "\n")
    return path


def streaming(corpus: Path) -> list[str]:
    return ["stage=pretrain", "model=tiny", "model.config.n_layer=2", "model.config.n_embd=32",
            "model.config.n_head=2", "data=hub", "data.name=json", f"data.data_files=[{corpus}]",
            "data.streaming=true", f"data.n_val={N_VAL}", f"data.block_size={BLOCK}", f"data.batch_size={BATCH}",
            "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.samples.prompts=[]"]


def expected_blocks(corpus: Path, n: int) -> list[list[int]]:
    """The first n training blocks of the stream, computed here: records after the first N_VAL (held
    out for validation), tokenized and packed by the pretraining format."""
    from llmlab.data.formats import LMFormat
    from llmlab.data.tokenizer import builtin_tokenizer

    records = [json.loads(line) for line in corpus.read_text().splitlines()][N_VAL:]
    blocks = LMFormat(builtin_tokenizer(), BLOCK)._blocks(records)
    return [next(blocks)["input_ids"].tolist() for _ in range(n)]


def seen(path: Path) -> list[list[int]]:
    return [row for line in path.read_text().splitlines() for row in json.loads(line)["rows"]]


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_streamed_local_corpus_trains_and_resumes_at_its_data_position(cli, tmp_path):
    """Stopped at step 4 and resumed with resume=auto: the run trains on exactly the stream's first
    8 x 4 blocks, in order (none repeated, none skipped), and its loss fell."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 600)
    log = tmp_path / "seen.jsonl"
    record = ["+callbacks.seen._target_=tests.test_streaming.RecordBatches", f"+callbacks.seen.path={log}"]
    run_dir = tmp_path / "run"
    first = cli(*streaming(corpus), *record, "stop_at_step=4", run_dir=run_dir)
    assert_ok(first)
    assert first.summary["global_step"] == 4
    assert len(seen(log)) == 4 * BATCH
    resumed = cli(*streaming(corpus), *record, "resume=auto", run_dir=run_dir)
    assert_ok(resumed)
    s = resumed.summary
    assert s["global_step"] == 8 and s["val_loss_last"] < s["val_loss_first"], s
    rows = seen(log)
    assert len(rows) == 8 * BATCH
    assert rows == expected_blocks(corpus, 8 * BATCH)



def _doc_ids(blocks) -> set[int]:
    """The document numbers whose start ('document NNNNNN') is inside the blocks."""
    import re

    from llmlab.data.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    return {int(m) for b in blocks for m in re.findall(r"document (\d{6})", tok.decode(b["input_ids"].tolist()))}


def _stream(files: list[Path]):
    from datasets import load_dataset

    from llmlab.data.formats import LMFormat, _PackedStream
    from llmlab.data.tokenizer import builtin_tokenizer

    ds = load_dataset("json", data_files=[str(f) for f in files], split="train", streaming=True)
    return _PackedStream(ds, LMFormat(builtin_tokenizer(), BLOCK))


def test_each_rank_tokenizes_only_its_share_of_the_stream(tmp_path):
    """Two ranks: disjoint documents that together cover the stream (whole files per rank when the files divide
    by the ranks, every other record otherwise); each rank tokenized only its share."""
    lines = write_corpus(tmp_path / "all.jsonl", 400).read_text().splitlines(keepends=True)
    files = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]
    files[0].write_text("".join(lines[:200]))
    files[1].write_text("".join(lines[200:]))
    for corpus in (files, files[:1]):  # 2 files (a file per rank), 1 file (every other record)
        shares, blocks = [], []
        for rank in (0, 1):
            stream = _stream(corpus)
            stream.rank, stream.world_size = rank, 2
            shares.append([r["text"] for r in stream._share()[0]])  # the records this rank reads and tokenizes
            blocks.append(list(stream))
        n = 200 * len(corpus)
        assert len(shares[0]) == len(shares[1]) == n // 2 and not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == n
        # the blocks a rank trains on are its share's records, packed (documents numbered in the text)
        assert _doc_ids(blocks[0]) <= {int(t[9:15]) for t in shares[0]}


def test_dataloader_workers_split_files_and_resume_at_the_exact_block(tmp_path):
    """Two DataLoader workers on a 4-file stream: each reads its own files; skipping k consumed batches (a resume)
    gives exactly the uninterrupted order from batch k on."""
    from torch.utils.data import DataLoader

    lines = write_corpus(tmp_path / "all.jsonl", 240).read_text().splitlines(keepends=True)
    files = [tmp_path / f"part{i}.jsonl" for i in range(4)]
    for i, f in enumerate(files):
        f.write_text("".join(lines[i * 60:(i + 1) * 60]))

    def batches(skip_batches: int) -> list[list[list[int]]]:
        stream = _stream(files)
        stream.batch_size, stream.skip = BATCH, skip_batches * BATCH
        loader = DataLoader(stream, batch_size=BATCH, num_workers=2, collate_fn=stream.fmt.collate)
        return [b["input_ids"].tolist() for b in loader]

    full = batches(0)
    rows = [r for b in full for r in b]
    assert len(full) > 6 and len({tuple(r) for r in rows}) == len(rows)  # no block twice: workers read apart
    for k in (1, 3, 4):
        assert batches(k) == full[k:], k
