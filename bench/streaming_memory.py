"""Peak memory of `data=hub data.streaming=true` as the corpus grows: reading all of it stays flat.

    python bench/streaming_memory.py [--sizes 10,100] [--in-memory 10] [--block 128] [--batch 16]

For each size (MB of generated text, JSON lines with a `text` field, cached under bench/out/), one
fresh subprocess builds llmlab's data module exactly as `data=hub data.name=json
data.data_files=[<file>] data.streaming=true` does (llmlab/data/sources.py -> datasets'
streaming reader -> llmlab/data/formats.py's on-the-fly tokenize-and-pack) and iterates the
training dataloader over the WHOLE corpus, so every byte passes through memory once. Reported: the
process's peak RSS (VmHWM) after imports + setup, and at the end; blocks and tokens read; seconds.
`--in-memory` sizes run the same with data.streaming=false (blocks kept in a list, as for `data=text`),
for contrast. Prints a markdown table (bench/RESULTS.md keeps it with the command).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "streaming"
WORDS = ["the", "reverse", "of", "sorted", "is", "letters", "model", "data", "stream", "memory", "corpus",
         "token", "block", "shifted", "by", "one", "abc", "dcba", "training", "large", "text", "grows"]


def corpus(mb: int) -> Path:
    """`mb` MB of generated prose, one JSON record per line (deterministic, written once)."""
    path = OUT / f"corpus_{mb}mb.jsonl"
    if path.is_file():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(mb)
    target, written = mb * 1_000_000, 0
    with open(path.with_suffix(".tmp"), "w") as f:
        while written < target:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    path.with_suffix(".tmp").rename(path)
    return path


def child(path: str, streaming: bool, block: int, batch: int) -> dict:
    """Runs in its own process: build the data module, read every training block, report memory."""
    from omegaconf import OmegaConf

    from llmlab.data.datamodule import LLMDataModule
    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.distributed.memory import status_mb

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "hub.yaml")
    cfg.merge_with({"name": "json", "data_files": [path], "streaming": streaming, "n_val": 100,
                    "block_size": block, "batch_size": batch})
    t0 = time.perf_counter()
    dm = LLMDataModule(cfg, "lm", builtin_tokenizer())
    dm.setup("fit")
    after_setup = status_mb("VmHWM")
    if streaming:
        loader = dm.train_dataloader()
    else:  # one pass over the in-memory blocks (its sampler is endless without a trainer's max_steps)
        from torch.utils.data import DataLoader

        loader = DataLoader(dm.train_set, batch_size=batch, collate_fn=dm.format.collate)
    blocks = 0
    for b in loader:
        blocks += b["input_ids"].shape[0]
    return {"streaming": streaming, "corpus_mb": round(Path(path).stat().st_size / 1e6, 1), "blocks": blocks,
            "tokens": blocks * block, "peak_rss_after_setup_mb": round(after_setup),
            "peak_rss_mb": round(status_mb("VmHWM")), "seconds": round(time.perf_counter() - t0, 1)}


def measure(mb: int, streaming: bool, block: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(corpus(mb)), "--block", str(block), "--batch", str(batch)]
    if not streaming:
        cmd.append("--no-stream")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--in-memory", default="10")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child")
    ap.add_argument("--no-stream", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, not args.no_stream, args.block, args.batch)))
        return
    rows = [measure(int(mb), True, args.block, args.batch) for mb in args.sizes.split(",") if mb]
    rows += [measure(int(mb), False, args.block, args.batch) for mb in args.in_memory.split(",") if mb]
    print("| data.streaming | corpus MB | blocks read | tokens | peak RSS after setup MB | peak RSS MB | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {str(r['streaming']).lower()} | {r['corpus_mb']} | {r['blocks']:,} | {r['tokens']:,} | "
              f"{r['peak_rss_after_setup_mb']} | {r['peak_rss_mb']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
