"""GRPO: llmlab's `stage=grpo` samples/s (rollout + update) vs TRL's GRPOTrainer, the share of time spent
generating on both sides, and peak memory of grpo with beta = 0 vs beta > 0 and with LoRA.

    python bench/grpo_vs_trl.py speed  [--steps 12] [--prompts 16] [--generations 8] [--length 16] [--repeats 2]
                                       [--threads 1] [--ablate]
    python bench/grpo_vs_trl.py memory [--steps 3] [--layers 12] [--width 768] [--threads 1]

speed: the tiny GPT-2 of conf/model/tiny.yaml (4 layers, 128 wide, byte vocabulary), random init (seed 0),
saved once and loaded by both sides (bench/sft_vs_trl.py). Prompts: the built-in tasks' prompts rendered
"Question: ...\n\nAnswer: ", reward: the built-in rule reward (a plain function on TRL's side, reward=task
on llmlab's). Same settings on both sides: `--prompts` prompts x `--generations` completions per rollout
and one optimizer step per rollout (TRL: per_device_train_batch_size = generation batch = prompts x G,
gradient_accumulation_steps 1, steps_per_generation 1), at most `--length` completion tokens sampled at
temperature 1 (top_k 0, top_p 1) with the KV cache through transformers' `generate`, loss_type dapo,
epsilon 0.2 / epsilon_high 0.28, scale_rewards group, num_iterations 1, beta 0 (no reference model on
either side), AdamW lr 1e-4 (betas 0.9/0.99, no weight decay), constant LR, gradient clipping 1.0, fp32,
dropout off, no evaluation, no checkpoints. Timed: every rollout + update after the first (llmlab: its
summary.json's timed steps; TRL: a callback from the end of step 1 to the end of the last step);
samples/s = completions / timed seconds. Generating share: time inside transformers'
`GenerationMixin.generate` (patched with a timer in both workers; the first rollout's call excluded) over
the timed seconds. Each side runs in its own subprocess and they alternate (load on this shared machine
hits both); medians are reported. `--ablate` adds a third side per repeat: llmlab with
stage.module.share_prompt=false (each row's prompt run in full in generate's prefill and the update, as TRL).

memory: a bigger GPT-2-shaped model (`--layers` x `--width`, byte vocabulary, random init), 4 prompts x 4
completions of 16 tokens, `--steps` rollouts; peak RSS (summary.json peak_rss_mb) of stage=grpo with
beta 0 (no reference kept), beta 0.04 (a frozen copy of the model as reference), and with peft=lora
(r 16, alpha 32 on c_attn) at beta 0 and 0.04 (the reference is the same model with the adapter off).
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


def timed_generate() -> list:
    """Patch transformers' generate with a timer; returns the list the durations go to."""
    from transformers.generation.utils import GenerationMixin

    calls, original = [], GenerationMixin.generate

    def generate(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            calls.append(time.perf_counter() - t0)

    GenerationMixin.generate = generate
    return calls


def llmlab_worker(args) -> dict:
    """`python -m llmlab.run stage=grpo ...` in this process, with generate timed."""
    import runpy

    calls = timed_generate()
    tmp = tempfile.mkdtemp()
    sys.argv = ["llmlab.run", "stage=grpo", "model=tiny", "model.init=pretrained", f"model.pretrained={args.model}",
                "model.tokenizer=null", "precision=32", "reward=task", f"data.batch_size={args.prompts}",
                f"stage.module.num_generations={args.generations}", f"stage.module.max_completion_length={args.length}",
                "stage.module.loss_type=dapo", "stage.module.epsilon=0.2", "stage.module.epsilon_high=0.28",
                "stage.module.scale_rewards=group", "stage.module.num_iterations=1", "stage.module.mini_batch_size=null",
                "stage.module.beta=0.0", "stage.module.optimizer.lr=1e-4", "stage.module.scheduler=null",
                "trainer.gradient_clip_val=1.0", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
                "trainer.num_sanity_val_steps=0", "~callbacks.model_checkpoint", "~callbacks.hf_export",
                "callbacks.samples.prompts=[]", "trainer.enable_progress_bar=false", "seed=0",
                f"hydra.run.dir={tmp}", *args.override]
    try:
        runpy.run_module("llmlab.run", run_name="__main__")  # as `python -m llmlab.run`
    except SystemExit as exit_:
        if exit_.code:
            raise
    s = json.loads((Path(tmp) / "summary.json").read_text())
    seconds = s["train_tokens_timed"] / s["tokens_per_sec"]  # every step after the first
    steps = s["global_step"] - 1
    return {"seconds": seconds, "completions": steps * args.prompts * args.generations,
            "generate_seconds": sum(calls[1:])}


def trl_worker(args) -> dict:
    calls = timed_generate()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmlab.data.builtin import ppo_prompts, rule_reward

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "answer": r["answer"]}
                              for r in ppo_prompts(2000, "train", 0)])

    def task(prompts, completions, answer, **kw):
        return [rule_reward(c, a) for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            if state.global_step == 1:
                self.t1, self.calls1 = now, len(calls)
            self.t_last, self.steps = now, state.global_step

    timer = Timer()
    n = args.prompts * args.generations
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=n,
                         gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.generations,
                         max_completion_length=args.length, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
                         loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group", num_iterations=1,
                         learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
                         eval_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_dropout=True,
                         gradient_checkpointing=False, seed=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=[task], args=cfg, train_dataset=data, processing_class=tok,
                              callbacks=[timer])
        trainer.train()
    return {"seconds": timer.t_last - timer.t1, "completions": (timer.steps - 1) * n,
            "generate_seconds": sum(calls[timer.calls1:])}


def run_worker(side: str, model_dir: Path, args, overrides: tuple = ()) -> dict:
    cmd = [sys.executable, __file__, "speed", f"--{side}-worker", str(model_dir), "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--generations", str(args.generations), "--length", str(args.length),
           *(f"--override={o}" for o in overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(args))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["samples_per_sec"] = r["completions"] / r["seconds"]
    r["generate_share"] = r["generate_seconds"] / r["seconds"]
    return r


def speed(args) -> dict:
    from sft_vs_trl import ensure_model

    model_dir = ensure_model(ROOT / "bench" / "out" / "tiny-random")
    ours, theirs, plain = [], [], []
    for i in range(args.repeats):
        ours.append(run_worker("llmlab", model_dir, args))
        theirs.append(run_worker("trl", model_dir, args))
        if args.ablate:  # the prompt run for every row, as before stages/shared_prefix.py
            plain.append(run_worker("llmlab", model_dir, args, ("stage.module.share_prompt=false",)))
        print(f"repeat {i}: llmlab {ours[-1]['samples_per_sec']:.1f} samples/s (generate "
              f"{ours[-1]['generate_share']:.0%}), TRL {theirs[-1]['samples_per_sec']:.1f} samples/s (generate "
              f"{theirs[-1]['generate_share']:.0%})"
              + (f", llmlab share_prompt=false {plain[-1]['samples_per_sec']:.1f}" if plain else ""), flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    a, b = med(ours, "samples_per_sec"), med(theirs, "samples_per_sec")
    ablation = {}
    if plain:
        c = med(plain, "samples_per_sec")
        ablation = {"llmlab_unshared_samples_per_sec": round(c, 1), "unshared_speedup_vs_trl": round(c / b, 3),
                    "llmlab_unshared_generate_share": round(med(plain, "generate_share"), 3),
                    "runs_llmlab_unshared": [round(r["samples_per_sec"], 1) for r in plain]}
    return {**ablation, "bench": "grpo_speed", "prompts": args.prompts, "generations": args.generations,
            "completion_tokens_max": args.length, "steps": args.steps, "threads": args.threads,
            "llmlab_samples_per_sec": round(a, 1), "trl_samples_per_sec": round(b, 1),
            "speedup_vs_trl": round(a / b, 3),
            "llmlab_generate_share": round(med(ours, "generate_share"), 3),
            "trl_generate_share": round(med(theirs, "generate_share"), 3),
            "runs_llmlab": [round(r["samples_per_sec"], 1) for r in ours],
            "runs_trl": [round(r["samples_per_sec"], 1) for r in theirs]}


def peak_rss(beta: float, peft: str, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmlab.run", "stage=grpo", "model=tiny", "model.init=scratch",
               "model.tokenizer=builtin", f"model.config.n_layer={args.layers}", f"model.config.n_embd={args.width}",
               f"model.config.n_head={max(1, args.width // 64)}", f"peft={peft}", "precision=32", "reward=task",
               "data.batch_size=4", "stage.module.num_generations=4", "stage.module.max_completion_length=16",
               f"stage.module.beta={beta}", f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0",
               "trainer.num_sanity_val_steps=0", "~callbacks.model_checkpoint", "~callbacks.hf_export",
               "callbacks.samples.prompts=[]", "trainer.enable_progress_bar=false", "seed=0", f"hydra.run.dir={tmp}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(args))
        if proc.returncode != 0:
            raise SystemExit(f"grpo beta={beta} peft={peft} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "summary.json").read_text())["peak_rss_mb"]


def memory(args) -> dict:
    rss = {f"{peft}_beta{beta}": peak_rss(beta, peft, args) for peft in ("none", "lora") for beta in (0.0, 0.04)}
    params_mb = 4 * (args.layers * 12 * args.width ** 2 + 259 * args.width + 256 * args.width) / 2 ** 20
    return {"bench": "grpo_memory", "model": f"gpt2-shaped {args.layers}x{args.width}, byte vocab",
            "fp32_weights_mb_approx": round(params_mb), "steps": args.steps, "threads": args.threads,
            **{f"peak_rss_mb_{k}": v for k, v in rss.items()},
            "reference_cost_mb_full": round(rss["none_beta0.04"] - rss["none_beta0.0"], 1),
            "reference_cost_mb_lora": round(rss["lora_beta0.04"] - rss["lora_beta0.0"], 1),
            "lora_saving_mb_beta0": round(rss["none_beta0.0"] - rss["lora_beta0.0"], 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: inherit)")
    parser.add_argument("--ablate", action="store_true", help="speed: also llmlab with stage.module.share_prompt=false")
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--llmlab-worker", dest="model_llmlab", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trl-worker", dest="model_trl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.what == "speed" else 3)
    if args.model_llmlab or args.model_trl:
        args.model = args.model_llmlab or args.model_trl
        result = llmlab_worker(args) if args.model_llmlab else trl_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    print(json.dumps(speed(args) if args.what == "speed" else memory(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
