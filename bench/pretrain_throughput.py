"""Pretraining tokens/s: llmlab (`python -m llmlab.run`) vs a plain PyTorch loop, and bf16 vs fp32.

Both sides use the same tiny model, the same packed built-in blocks, the same batch, optimizer,
gradient clipping, LR schedule and precision; only the framework around the step differs. Every
measurement runs in its own subprocess and the two sides alternate, so machine noise hits both
(this machine is shared); ratios are taken between neighbours, then the median is reported.

    .venv/bin/python bench/pretrain_throughput.py [--steps 60] [--repeats 3] [--out bench/out]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
          "callbacks.samples.prompts=[]", "data.n_train=4000"]


def llmlab_tokens_per_sec(steps: int, precision: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "llmlab.run", *COMMON, f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", f"precision={precision}", f"hydra.run.dir={d}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads((Path(d) / "summary.json").read_text())["tokens_per_sec"]


LIGHTNING_PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true"}


def plain_tokens_per_sec(steps: int, precision: str) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plain_loop.py"), str(steps), precision, "plain",
                          str(ROOT / "conf"), "data.n_train=4000"], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_sec"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = {p: {"llmlab": [], "plain": []} for p in LIGHTNING_PRECISION}
    t0 = time.time()
    for r in range(args.repeats):
        for p in LIGHTNING_PRECISION:
            rows[p]["plain"].append(plain_tokens_per_sec(args.steps, p))
            rows[p]["llmlab"].append(llmlab_tokens_per_sec(args.steps, p))
            print(f"repeat {r} {p}: plain {rows[p]['plain'][-1]:.0f} tok/s, llmlab {rows[p]['llmlab'][-1]:.0f} tok/s",
                  flush=True)
    print(f"\n{args.steps} steps, batch 16 x 128 tokens, tiny GPT-2 (4 layers, 128 wide), {args.repeats} repeats, "
          f"{time.time() - t0:.0f} s")
    print("| precision | plain tok/s (median) | llmlab tok/s (median) | llmlab / plain (median of paired ratios) |")
    print("|---|---|---|---|")
    for p, r in rows.items():
        ratio = statistics.median(a / b for a, b in zip(r["llmlab"], r["plain"]))
        print(f"| {p} | {statistics.median(r['plain']):.0f} | {statistics.median(r['llmlab']):.0f} | {ratio:.2f} |")
    base = rows["32"]
    for p in ("bf16-mixed", "bf16-true"):
        ratio = statistics.median(a / b for a, b in zip(rows[p]["llmlab"], base["llmlab"]))
        print(f"llmlab {p} / fp32: {ratio:.2f}x")


if __name__ == "__main__":
    main()
