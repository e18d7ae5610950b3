"""Peak memory (RSS) of stage=dpo (frozen reference copy) vs the reference-free stage=orpo / stage=simpo
(no reference built) and stage=kto (reference, plus B mismatched KL rows), same model and batch.

    OMP_NUM_THREADS=1 python bench/prefs_memory.py [--layers 8] [--width 512] [--steps 3]

Each stage runs `python -m llmlab.run` in its own process (so its peak RSS, getrusage ru_maxrss, is its
own), on a randomly initialised GPT-2 shape from model=tiny widened to --layers x --width (fp32), the
built-in pairs, batch 16, `--steps` optimizer steps, one validation batch, no generation, no checkpoint or
export (training memory only). Reported: the
summary.json keys peak_rss_mb and param_bytes, and each stage's RSS over orpo's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(stage: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "llmlab.run", f"stage={stage}", "model=tiny", f"model.config.n_layer={args.layers}",
           f"model.config.n_embd={args.width}", f"model.config.n_head={args.width // 64}",
           f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=1",
           "data.n_train=64", "data.n_val=16", "data.batch_size=16", "stage.module.eval_generation=false",
           "trainer.enable_progress_bar=false", "~callbacks.model_checkpoint", "~callbacks.hf_export", "~callbacks.samples",
           f"hydra.run.dir={out / stage}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / stage / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", default="dpo,orpo,simpo,kto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {s: run(s, args, Path(tmp)) for s in args.stages.split(",")}
    base = rows.get("orpo", next(iter(rows.values())))["peak_rss_mb"]
    print(f"{args.layers} layers x {args.width}, batch 16, {args.steps} steps, fp32")
    print("| stage | reference | params MB | peak RSS MB | vs orpo |\n|---|---|---|---|---|")
    for s, r in rows.items():
        ref = "frozen copy" if s in ("dpo", "kto") else "none"
        print(f"| {s} | {ref} | {r['param_bytes'] / 2**20:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - base:+.0f} MB ({r['peak_rss_mb'] / base:.2f}x) |")


if __name__ == "__main__":
    main()
