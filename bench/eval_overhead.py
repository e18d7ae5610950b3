"""lm-eval overhead: the `builtin` task set on the tiny model, and what lm-eval adds over llmlab's own loop.

    .venv/bin/python bench/eval_overhead.py [--model DIR] [--n 200] [--no-append]

Measures, in one process run (same machine state):
1. `python -m llmlab.eval <model> eval=builtin` end to end (a new process: imports, model load, lm-eval
   task build, 4 x n log-likelihoods + n generations, eval.json), wall seconds;
2. in process: `llmlab.evaluation.harness.evaluate` on the loaded model (the lm-eval part alone), seconds;
3. llmlab's own held-out exact match on the same n items (stage=sft's validation code: left-padded
   greedy generation in batches of 32), seconds: the generative half without lm-eval.
Default model: the cached tiny-sft base (`${llmlab_base:tiny-sft}`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from llmlab.models.bases import ensure_base

    model_dir = args.model or ensure_base("tiny-sft")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.eval", model_dir, f"eval.data.n={args.n}",
               f"batch_size={args.batch_size}", f"out={tmp}/eval.json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        cli_seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-2000:]
        cli = json.loads(Path(f"{tmp}/eval.json").read_text())

    from omegaconf import OmegaConf

    from llmlab.evaluation.harness import DEFAULT_TEMPLATE, evaluate
    from llmlab.models.load import load

    model, tokenizer = load(model_dir)
    task_set = OmegaConf.load(ROOT / "conf" / "eval" / "builtin.yaml")
    task_set.data.n = args.n
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, task_set, batch_size=args.batch_size)
    lm_eval_seconds = time.perf_counter() - t0

    from llmlab.data.builtin import sft_examples
    from llmlab.data.formats import SFTFormat
    from llmlab.evaluation.metrics import ExactMatch
    from llmlab.evaluation.generation import greedy_answers

    t0 = time.perf_counter()
    fmt = SFTFormat(tokenizer, 128, prompt_template=DEFAULT_TEMPLATE)
    examples, metric = fmt.build(sft_examples(args.n, "validation", 0), "val"), ExactMatch()
    for i in range(0, len(examples), 32):
        batch = fmt.collate(examples[i:i + 32])
        metric.update(greedy_answers(model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], 16), batch["answers"])
    own_seconds = time.perf_counter() - t0

    metrics = {t: r["metrics"] for t, r in result["tasks"].items()}
    lines = [
        f"## lm-eval overhead: the builtin task set on the tiny model ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, issue 11)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; lm-eval {result['lm_eval_version']}; model {model_dir} "
        f"(4 layers x 128, byte tokenizer). Command: `{' '.join(['python', 'bench/eval_overhead.py', *sys.argv[1:]])}`",
        "",
        "| what | n items | seconds |",
        "|---|---|---|",
        f"| `python -m llmlab.eval <tiny-sft> eval=builtin batch_size={args.batch_size}` (new process, end to end) | "
        f"{args.n} MC ({4 * args.n} log-likelihoods) + {args.n} generations | {cli_seconds:.1f} |",
        f"| of which lm-eval (`llmlab.evaluation.harness.evaluate`, in process, model loaded) | same | {lm_eval_seconds:.1f} |",
        f"| llmlab's own held-out exact match (greedy, batches of 32) | {args.n} generations | {own_seconds:.1f} |",
        "",
        f"Scores: {json.dumps(metrics)}; llmlab's own exact match {metric.compute().item():.4f} "
        f"(CLI run: {json.dumps({t: r['metrics'] for t, r in cli['tasks'].items()})}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
