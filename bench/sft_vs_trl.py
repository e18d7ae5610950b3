"""SFT training throughput: llmlab's `stage=sft` vs TRL's SFTTrainer, same model, data and settings.

    python bench/sft_vs_trl.py [--steps 150] [--batch 16] [--precision 32|bf16-mixed] [--repeats 2]

Model: the tiny GPT-2 of conf/model/tiny.yaml (4 layers, 128 wide, byte vocabulary), random init
(seed 0), saved once and loaded by both. Data: the built-in SFT examples ("Question: reverse cab\n\n
Answer: " -> "bac"), no packing, loss on the completion + EOS only (TRL: prompt/completion dataset,
completion_only_loss). Settings: AdamW lr 1e-3, weight decay 0.05, 10 warmup steps + cosine,
gradient clipping 1.0, batch `--batch`, `--steps` optimizer steps, no evaluation, no checkpoints.
tokens/s = non-padding tokens / training time, both excluding the first step (warm-up); llmlab's
comes from its summary.json (`tokens_per_sec`), TRL's from `num_input_tokens_seen` (non-padding)
timed by a callback. Each side runs in its own subprocess; runs alternate (llmlab, TRL, llmlab, ...)
so load on a shared machine affects both alike. Prints the median of each and the ratio.
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
TEMPLATE = "Question: {prompt}\n\nAnswer: "


def ensure_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.models.build import architecture_config

    tok = builtin_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture_config(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_llmlab(model_dir: Path, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.run", "stage=sft", "model=tiny", "model.init=pretrained",
               f"model.pretrained={model_dir}", "model.tokenizer=null", f"precision={args.precision}",
               f"data.n_train={args.n_train}", f"data.batch_size={args.batch}", "data.pack_examples=false",
               f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
               "stage.module.eval_generation=false", "stage.module.optimizer.lr=1e-3",
               "stage.module.optimizer.weight_decay=0.05", "stage.module.scheduler.warmup_steps=10",
               "trainer.gradient_clip_val=1.0", "~callbacks.model_checkpoint", "~callbacks.hf_export",
               "callbacks.samples.prompts=[]", "trainer.enable_progress_bar=false", "seed=0",
               f"hydra.run.dir={tmp}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llmlab run failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "summary.json").read_text())["tokens_per_sec"]


def trl_worker(model_dir: str, steps: int, batch: int, precision: str, n_train: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llmlab.data.builtin import sft_examples

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "completion": r["response"]}
                              for r in sft_examples(n_train, "train", 0)])

    class Timer(TrainerCallback):
        t1 = tokens1 = None

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if state.global_step == 1:
                self.t1, self.tokens1 = now, state.num_input_tokens_seen
            self.t_last, self.tokens_last = now, state.num_input_tokens_seen

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                        lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.05, adam_beta1=0.9,
                        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
                        eval_strategy="no", report_to=[], max_length=128, packing=False,
                        completion_only_loss=True, bf16=precision == "bf16-mixed", use_cpu=True,
                        dataloader_drop_last=True, include_num_input_tokens_seen="non_padding", seed=0,
                        disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    return (timer.tokens_last - timer.tokens1) / (timer.t_last - timer.t1)


def run_trl(model_dir: Path, args) -> float:
    cmd = [sys.executable, __file__, "--trl-worker", str(model_dir), "--steps", str(args.steps), "--batch",
           str(args.batch), "--precision", args.precision, "--n-train", str(args.n_train)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("TOKENS_PER_SEC ")), None)
    if line is None:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return float(line.split()[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        tps = trl_worker(args.trl_worker, args.steps, args.batch, args.precision, args.n_train)
        print(f"TOKENS_PER_SEC {tps:.2f}", flush=True)
        return 0
    model_dir = ensure_model(ROOT / "bench" / "out" / "tiny-random")
    ours, theirs = [], []
    for i in range(args.repeats):
        ours.append(run_llmlab(model_dir, args))
        theirs.append(run_trl(model_dir, args))
        print(f"repeat {i}: llmlab {ours[-1]:.0f} tok/s, TRL {theirs[-1]:.0f} tok/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({"precision": args.precision, "batch": args.batch, "steps": args.steps,
                      "llmlab_tokens_per_sec": round(a, 1), "trl_tokens_per_sec": round(b, 1),
                      "ratio": round(a / b, 3), "runs_llmlab": ours, "runs_trl": [round(t, 1) for t in theirs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
