"""Prepared corpora at scale (issue 22, point 6): preparation speed, bytes on disk, training memory and start time
on a corpus of several GB against a small one, and the data loader's tokens/s per rank.

    python bench/prepared_corpus.py --workdir /var/tmp/llmlab-corpus --size-gb 2 [--procs 1 2] [--subset-mb 256]

Writes a JSON-lines corpus of `--size-gb` GB (tinyshakespeare's paragraphs, numbered, two per document: real
text repeated), a 6 MB one the same way, prepares both with `python -m llmlab.prepare` (the default tiny model's
byte tokenizer; `--procs` processes; a run with a process count in `--subset-procs` prepares only the first
`--subset-mb` MB, for the MB/s of that count without hours of a slow single process), then runs the same short
pretraining on each (peak RSS from summary.json), measures the wall time of a 1-step run with no validation on the
prepared corpus against the built-in data (start to step 1, process start included), and reads blocks through the
training DataLoader for tokens/s. Prints a markdown table and the commands; numbers go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def write_corpus(path: Path, size: int) -> Path:
    if path.is_file() and path.stat().st_size >= size:
        return path
    paragraphs = TEXT.read_text().split("\n\n")
    tmp = path.with_suffix(".partial")
    written, i = 0, 0
    with open(tmp, "w") as f:
        while written < size:
            doc = f"{i} {paragraphs[i % len(paragraphs)]}\n\n{paragraphs[(i * 7 + 1) % len(paragraphs)]}"
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    os.replace(tmp, path)
    return path


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc


def prepare(corpus: Path, cache: Path, procs: int) -> dict:
    cmd = [sys.executable, "-m", "llmlab.prepare", "data=text", f"data.train_files=[{corpus}]",
           f"data.num_proc={procs}", f"data.cache_dir={cache}"]
    wall, _ = run(cmd, {"OMP_NUM_THREADS": "1"})
    metas = [json.loads(p.read_text()) for p in cache.glob("*/meta.json")]
    seconds = sum(m["seconds"] for m in metas)
    tokens = sum(m["n_tokens"] for m in metas)
    disk = sum((p.parent / "tokens.bin").stat().st_size + (p.parent / "docs.npy").stat().st_size
               for p in cache.glob("*/meta.json"))
    size = corpus.stat().st_size
    return {"cmd": " ".join(cmd[1:]), "wall_s": round(wall, 1), "tokenize_s": round(seconds, 1),
            "mb_per_s": round(size / 1e6 / seconds, 2), "tokens": tokens, "bytes_per_token": round(disk / tokens, 3),
            "text_mb": round(size / 1e6, 1)}


TRAIN = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=4",
         "trainer.enable_progress_bar=false", "data.batch_size=8"]


def train(corpus: Path | None, cache: Path, out: Path, extra: list[str]) -> tuple[float, dict, str]:
    data = ["data=text", f"data.train_files=[{corpus}]", f"data.cache_dir={cache}"] if corpus else []
    cmd = [sys.executable, "-m", "llmlab.run", *data, *extra, f"hydra.run.dir={out}"]
    wall, _ = run(cmd, {"OMP_NUM_THREADS": "2"})
    return wall, json.loads((out / "summary.json").read_text()), " ".join(cmd[1:])


def loader_rate(corpus: Path, cache: Path, workers: int, batches: int = 2000) -> float:
    """Tokens/s of the training DataLoader of one rank (of 2) on the prepared corpus: random blocks of 256
    through ResumableSampler and the LM collator, no model."""
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from llmlab.data.corpus import lm_splits
    from llmlab.data.datamodule import ResumableSampler
    from llmlab.data.formats import LMFormat
    from llmlab.data.tokenizer import builtin_tokenizer

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "text.yaml")
    cfg.train_files, cfg.cache_dir, cfg.block_size = [str(corpus)], str(cache), 256
    tok = builtin_tokenizer()
    train_set, _ = lm_splits(cfg, tok, 256, seed=0)
    sampler = ResumableSampler(len(train_set), seed=0, rank=1, world_size=2, length=batches * 16)
    loader = DataLoader(train_set, batch_size=16, sampler=sampler, collate_fn=LMFormat(tok, 256).collate,
                        num_workers=workers)
    it = iter(loader)
    next(it)  # workers started
    t0, tokens = time.perf_counter(), 0
    for batch in it:
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--procs", type=int, nargs="+", default=[2])
    ap.add_argument("--subset-procs", type=int, nargs="*", default=[1])
    ap.add_argument("--subset-mb", type=int, default=256)
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    big = write_corpus(w / f"corpus-{args.size_gb:g}gb.jsonl", int(args.size_gb * 1e9))
    small = write_corpus(w / "corpus-6mb.jsonl", 6 * 10**6)
    rows = {}
    for procs in args.subset_procs:
        subset = w / f"corpus-{args.subset_mb}mb.jsonl"
        write_corpus(subset, args.subset_mb * 10**6)
        rows[f"prepare {args.subset_mb} MB, {procs} process(es)"] = prepare(subset, w / f"cache-sub-{procs}", procs)
    for procs in args.procs:
        rows[f"prepare {args.size_gb:g} GB, {procs} process(es)"] = prepare(big, w / f"cache-{procs}", procs)
    print(json.dumps(rows, indent=1), flush=True)
    cache = w / f"cache-{args.procs[-1]}"
    prepare(small, cache, 1)
    mem = {}
    for name, corpus in (("6 MB", small), (f"{args.size_gb:g} GB", big)):
        wall, summary, cmd = train(corpus, cache, w / f"run-{name.replace(' ', '')}", TRAIN)
        mem[name] = {"peak_rss_mb": summary["peak_rss_mb"], "wall_s": round(wall, 1), "cmd": cmd}
    print(json.dumps(mem, indent=1), flush=True)
    one_step = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                "trainer.enable_progress_bar=false", "data.batch_size=8", "callbacks.samples.prompts=[]"]
    start = {}
    for rep in range(3):  # alternated: the machine is shared
        for name, corpus in (("built-in", None), (f"prepared {args.size_gb:g} GB", big)):
            wall, _, cmd = train(corpus, cache, w / f"start-{rep}-{name.split()[0]}", one_step)
            start.setdefault(name, []).append(round(wall, 2))
            start[f"{name} cmd"] = cmd
    print(json.dumps(start, indent=1), flush=True)
    rates = {f"{n} workers": round(loader_rate(big, cache, n)) for n in (0, 2)}
    print(json.dumps(rates, indent=1), flush=True)
    print(json.dumps({"prepare": rows, "memory": mem, "start": start, "loader_tokens_per_s": rates}))


if __name__ == "__main__":
    main()
