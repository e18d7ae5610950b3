"""PPO throughput of `stage=ppo` on the tiny model: samples (prompt + response episodes) per second of
rollout + update, and the share of that time spent generating.

    python bench/ppo_throughput.py [--iterations 20] [--batch 16] [--samples-per-prompt 1] [--mini-batch 8]
                                   [--ppo-epochs 2] [--response-length 8 16] [--precision 32]

Model: the tiny GPT-2 of conf/model/tiny.yaml (4 layers, 128 wide, byte vocabulary), random init
(seed 0, the same checkpoint as bench/sft_vs_trl.py). Prompts: the built-in PPO prompts; reward: the
built-in rule reward. `--samples-per-prompt k` > 1 samples k responses per prompt (with the
leave-one-out baseline); samples/s counts episodes (prompts x k). Responses are sampled (the
stage's temperature, KV cache) with a budget drawn per response from `--response-length` and no stop
at EOS, so every iteration generates the same number of tokens
whatever the model has learnt. One iteration = rollout (generate, reward, policy + reference +
value forward, GAE) + `--ppo-epochs` passes over mini-batches. Reported: the mean over iterations
(the first excluded) of samples/s and of the generation share, from the run's history.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    from sft_vs_trl import ensure_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--response-length", type=int, nargs=2, default=[8, 16])
    parser.add_argument("--precision", default="32")
    args = parser.parse_args()
    model_dir = ensure_model(ROOT / "bench" / "out" / "tiny-random")
    k = args.samples_per_prompt
    steps_per_iteration = args.ppo_epochs * -(-args.batch * k // args.mini_batch)
    lo, hi = args.response_length
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.run", "stage=ppo", "model=tiny", "model.init=pretrained",
               f"model.pretrained={model_dir}", "model.tokenizer=null", f"precision={args.precision}",
               f"data.batch_size={args.batch}", "data.n_train=4000", f"stage.module.samples_per_prompt={k}",
               f"stage.module.group_baseline={'true' if k > 1 else 'false'}",
               f"stage.module.mini_batch_size={args.mini_batch}",
               f"stage.module.ppo_epochs={args.ppo_epochs}", f"stage.module.response_length=[{lo},{hi}]",
               "stage.module.stop_at_eos=false", f"trainer.max_steps={args.iterations * steps_per_iteration}",
               "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "~callbacks.model_checkpoint",
               "~callbacks.hf_export", "callbacks.samples.prompts=[]", "trainer.enable_progress_bar=false",
               "trainer.log_every_n_steps=1", "seed=0", f"hydra.run.dir={tmp}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ppo run failed:\n{proc.stderr[-3000:]}")
        history = json.loads((Path(tmp) / "history.json").read_text())
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    samples = [v for _, v in history["train/samples_per_sec"]][1:]
    share = [v for _, v in history["train/generate_share"]][1:]
    print(json.dumps({"bench": "ppo_throughput", "precision": args.precision, "batch": args.batch,
                      "samples_per_prompt": k,
                      "mini_batch": args.mini_batch, "ppo_epochs": args.ppo_epochs, "response_length": [lo, hi],
                      "iterations": summary.get("ppo_iterations"),
                      "samples_per_sec": round(statistics.mean(samples), 2),
                      "generate_share": round(statistics.mean(share), 3),
                      "tokens_per_sec": summary.get("tokens_per_sec")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
