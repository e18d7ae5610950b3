"""DPO: llmlab's `stage=dpo` step time vs TRL's DPOTrainer, and peak memory of DPO+LoRA vs SFT+LoRA.

    python bench/dpo_vs_trl.py speed  [--steps 60] [--batch 16] [--repeats 2] [--threads N] [--precomputed]
                                      [--share-prompt]
    python bench/dpo_vs_trl.py memory [--steps 20] [--batch 16] [--layers 12] [--width 768] [--threads N]
                                      [--release-freed-memory]

--threads N sets OMP_NUM_THREADS=N for every subprocess (both sides alike); on a CPU machine shared
with other jobs, 2 spinning OpenMP threads per process slow a run several-fold and drown the signal.

speed: the tiny GPT-2 of conf/model/tiny.yaml (4 layers, 128 wide, byte vocabulary), random init
(seed 0), saved once and loaded by both sides. Data: the built-in preference pairs (prompt rendered
"Question: ...\n\nAnswer: ", chosen = the correct answer, rejected = a plausible wrong one). Settings
on both sides: sigmoid DPO (llmlab with stage.module.sft_weight=0: no RPO NLL term, which TRL's
loss_type=["sigmoid"] does not have), beta 0.1, frozen reference = a copy of the starting model, AdamW lr 1e-4
(betas 0.9/0.95, no weight decay), constant LR, gradient clipping 1.0, batch `--batch` pairs, fp32,
dropout off, no gradient checkpointing, no evaluation, no checkpoints, `--steps` optimizer steps.
`--precomputed` also times both sides with reference log-probs scored once before training (llmlab
`stage.module.precompute_reference=true`, TRL `precompute_ref_log_probs=True`; the scoring pass is not
in the timed window on either side). The llmlab sides run `stage.module.share_prompt=false` (full rows, as
TRL); `--share-prompt` also times llmlab's default `share_prompt=true` (each pair's prompt through the policy
and the reference once; TRL has no such option).
Step time = training time / steps, excluding the first step; llmlab's from its summary.json
(train_tokens_timed / tokens_per_sec), TRL's from a callback. Each side runs in its own subprocess
and they alternate, so load on this shared machine hits both; medians are reported.

memory: a bigger GPT-2-shaped model (`--layers` x `--width`, byte vocabulary, random init) with
peft=lora (r 16, alpha 32, on c_attn); peak RSS (summary.json peak_rss_mb) of `stage=dpo` (its
reference is the same model with the adapter disabled: no copy) vs `stage=sft`, same data batch
size (`--batch` pairs vs `--batch` examples) and also SFT at 2x batch (the same number of rows as DPO),
DPO with `stage.module.share_prompt=false` (full rows, TRL's layout; the default shares each pair's prompt)
and DPO with `stage.module.split_pairs=true` (chosen and rejected halves one at a time).
DPO runs with the stage's defaults otherwise (incl. its sft_weight NLL term on the chosen rows).
`--release-freed-memory` runs every side with `release_freed_memory=true` (glibc returns freed blocks of
128 KiB or more at once, so the peak tracks live memory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Question: {prompt}\n\nAnswer: "
sys.path.insert(0, str(ROOT / "bench"))


def env(args) -> dict:
    return {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}


def ensure_model(path: Path) -> Path:
    from sft_vs_trl import ensure_model as make

    return make(path)


def run_llmlab(model_dir: Path, args, precomputed: bool = False, *extra: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.run", "stage=dpo", "model=tiny", "model.init=pretrained", *extra,
               f"stage.module.precompute_reference={str(precomputed).lower()}",
               f"model.pretrained={model_dir}", "model.tokenizer=null", "precision=32", "stage.module.sft_weight=0",
               f"data.n_train={args.n_train}", f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}",
               "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "stage.module.eval_generation=false",
               "stage.module.optimizer.lr=1e-4", "stage.module.scheduler=null", "trainer.gradient_clip_val=1.0",
               "~callbacks.model_checkpoint", "~callbacks.hf_export", "callbacks.samples.prompts=[]",
               "trainer.enable_progress_bar=false", "seed=0", f"hydra.run.dir={tmp}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(args))
        if proc.returncode != 0:
            raise SystemExit(f"llmlab run failed:\n{proc.stderr[-3000:]}")
        s = json.loads((Path(tmp) / "summary.json").read_text())
        return s["train_tokens_timed"] / s["tokens_per_sec"] / (s["global_step"] - 1)


def trl_worker(model_dir: str, steps: int, batch: int, n_train: int, precomputed: bool) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from llmlab.data.builtin import preference_pairs

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in preference_pairs(n_train, "train", 0)])

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if state.global_step == 1:
                self.t1 = now
            self.t_last, self.steps = now, state.global_step

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                        adam_beta2=0.95, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=128,
                        logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, gradient_checkpointing=False, disable_dropout=True, dataloader_drop_last=True,
                        precompute_ref_log_probs=precomputed, seed=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    return (timer.t_last - timer.t1) / (timer.steps - 1)


def run_trl(model_dir: Path, args, precomputed: bool = False) -> float:
    cmd = [sys.executable, __file__, "speed", "--trl-worker", str(model_dir), "--steps", str(args.steps),
           "--batch", str(args.batch), "--n-train", str(args.n_train), *(["--precomputed"] if precomputed else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(args))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STEP_SECONDS ")), None)
    if line is None:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    return float(line.split()[1])


def speed(args) -> dict:
    model_dir = ensure_model(ROOT / "bench" / "out" / "tiny-random")
    full_rows = "stage.module.share_prompt=false"  # TRL's layout: every row runs its prompt
    sides = {"llmlab": lambda: run_llmlab(model_dir, args, False, full_rows), "trl": lambda: run_trl(model_dir, args)}
    if args.precomputed:
        sides["llmlab_precomputed"] = lambda: run_llmlab(model_dir, args, True, full_rows)
        sides["trl_precomputed"] = lambda: run_trl(model_dir, args, precomputed=True)
    if args.share_prompt:
        sides["llmlab_share_prompt"] = lambda: run_llmlab(model_dir, args, False, "stage.module.share_prompt=true")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.repeats):  # the sides alternate, so load hits each alike
        for name, run in sides.items():
            times[name].append(run())
        print(f"repeat {i}: " + ", ".join(f"{n} {t[-1] * 1000:.1f}" for n, t in times.items()) + " ms/step", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"bench": "dpo_speed", "batch_pairs": args.batch, "steps": args.steps, "threads": args.threads,
           **{f"{n}_ms_per_step": round(m * 1000, 1) for n, m in med.items()},
           "speedup_vs_trl": round(med["trl"] / med["llmlab"], 3),
           **{f"runs_{n}_ms": [round(x * 1000, 1) for x in t] for n, t in times.items()}}
    if args.share_prompt:
        out["share_prompt_speedup_vs_trl"] = round(med["trl"] / med["llmlab_share_prompt"], 3)
    if args.precomputed:
        out["precomputed_speedup_vs_trl"] = round(med["trl"] / med["llmlab_precomputed"], 3)
        out["precomputed_speedup_vs_trl_precomputed"] = round(med["trl_precomputed"] / med["llmlab_precomputed"], 3)
    return out


def peak_rss(stage: str, batch: int, args, *extra: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.run", f"stage={stage}", "model=tiny", "model.init=scratch",
               "model.tokenizer=builtin", f"model.config.n_layer={args.layers}", f"model.config.n_embd={args.width}",
               f"model.config.n_head={max(1, args.width // 64)}", "peft=lora", "precision=32",
               f"data.n_train={args.n_train}", f"data.batch_size={batch}", f"trainer.max_steps={args.steps}",
               "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "stage.module.eval_generation=false",
               "~callbacks.model_checkpoint", "~callbacks.hf_export", "callbacks.samples.prompts=[]",
               "trainer.enable_progress_bar=false", "seed=0", f"hydra.run.dir={tmp}",
               *(["release_freed_memory=true"] if args.release_freed_memory else []), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(args))
        if proc.returncode != 0:
            raise SystemExit(f"{stage} run failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "summary.json").read_text())["peak_rss_mb"]


def memory(args) -> dict:
    dpo = peak_rss("dpo", args.batch, args)
    full = peak_rss("dpo", args.batch, args, "stage.module.share_prompt=false")
    sft = peak_rss("sft", args.batch, args)
    sft2 = peak_rss("sft", 2 * args.batch, args)
    split = peak_rss("dpo", args.batch, args, "stage.module.split_pairs=true")
    return {"bench": "dpo_lora_memory", "model": f"gpt2-shaped {args.layers}x{args.width}, byte vocab, LoRA r16",
            "batch": args.batch, "threads": args.threads, "release_freed_memory": args.release_freed_memory,
            "dpo_peak_rss_mb": dpo, "sft_peak_rss_mb": sft, "sft_2x_batch_peak_rss_mb": sft2,
            "dpo_over_sft": round(dpo / sft, 3), "dpo_over_sft_same_rows": round(dpo / sft2, 3),
            "dpo_full_rows_peak_rss_mb": full, "dpo_full_rows_over_sft": round(full / sft, 3),
            "dpo_split_pairs_peak_rss_mb": split, "dpo_split_pairs_over_sft": round(split / sft, 3)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: inherit)")
    parser.add_argument("--precomputed", action="store_true", help="speed: also both sides with precomputed reference log-probs")
    parser.add_argument("--share-prompt", action="store_true",
                        help="speed: also llmlab's default stage.module.share_prompt=true (each prompt run once)")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="memory: every run with release_freed_memory=true (the peak tracks live memory)")
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.what == "speed" else 20)
    if args.trl_worker:
        print(f"STEP_SECONDS {trl_worker(args.trl_worker, args.steps, args.batch, args.n_train, args.precomputed):.6f}", flush=True)
        return 0
    print(json.dumps(speed(args) if args.what == "speed" else memory(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
