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

