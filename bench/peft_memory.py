"""Peak memory of one training step on the OPT-1.3B architecture: full bf16 vs LoRA bf16 vs QLoRA.

    python bench/peft_memory.py [--seq 256] [--batch 1] [--steps 1] [--methods full,lora,qlora,lora_fp32] [--live]
        [--loss-chunk N]

Random weights (model=opt1.3b's `config:` values, no download). Each method runs in its own
subprocess, so its peak RSS (getrusage ru_maxrss, CPU memory) is its own:
- full:  weights bf16, every parameter trained, AdamW (states in bf16, like the weights)
- lora:  weights bf16 frozen, LoRA r=16 alpha=32 on q_proj, v_proj (the course's adapter), AdamW
- lora_fp32: the same LoRA on fp32 weights, no autocast (the fp32 side of the course's bf16 recipe)
- qlora: the same LoRA on a base loaded 4-bit NF4 + double quantization, bf16 compute
  (`prepare_model_for_kbit_training` with gradient checkpointing, as conf/peft/qlora.yaml);
  bitsandbytes quantizes as it loads, so the random bf16 weights are first saved to disk in
  100 MB shards (a one-time cache; loading maps one shard at a time).
One step = forward + backward + optimizer step on a batch of `--batch` x `--seq` random tokens, the loss
computed as llmlab's pretrain/sft step does (`--loss-chunk N`: with stage.module.loss_chunk_tokens=N);
`--steps N` runs N of them (step_s: the last one's time, step_times_s: each; the peak covers all).
Reported: the step's peak RSS (after the model is built, freed heap is returned to the OS with
malloc_trim and the kernel's peak counter VmHWM is reset, so loading transients do not count), the
RSS before the step (anonymous and file-mapped parts), the peak while loading, and llmlab's dry-run
estimate for the same setting (llmlab/distributed/memory.py) for comparison, and the RSS of the interpreter and
libraries before any model (the same in every method; `--live`: peak RSS tracks live memory).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from llmlab.distributed.memory import release_and_reset_peak, status_mb

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMLAB_BENCH_CACHE", ROOT / "bench" / "out" / "opt1.3b-random-bf16"))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def opt_config():
    from omegaconf import OmegaConf

    from llmlab.models.build import architecture_config

    return architecture_config(OmegaConf.load(ROOT / "conf" / "model" / "opt1.3b.yaml"))


def peft_node(method: str):
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "conf" / "peft" / "lora.yaml")
    if method == "qlora":
        node = OmegaConf.merge(node, OmegaConf.load(ROOT / "conf" / "peft" / "qlora.yaml"))
        node.pop("defaults", None)
    node.target_modules = ["q_proj", "v_proj"]
    return node


def ensure_checkpoint() -> Path:
    """Random OPT-1.3B weights in bf16, saved once (for QLoRA, which quantizes at load time)."""
    if (CACHE / "config.json").is_file():
        return CACHE
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(opt_config(), dtype=torch.bfloat16)
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE, max_shard_size="100MB")
    return CACHE


def worker(method: str, batch: int, seq: int, steps: int = 1, loss_chunk: int | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmlab.losses import causal_lm_loss_sum, chunked_causal_lm_loss_sum
    from llmlab.stages.common import forward_hidden, forward_logits

    from llmlab.distributed.memory import estimate
    from llmlab.models.peft import apply_peft, quantization_config

    import bitsandbytes  # noqa: F401  (imported by every method, so the libraries' share is the same)
    import peft  # noqa: F401
    from transformers import OPTForCausalLM  # noqa: F401  (the model class's import graph: torchao, dtensor)

    libraries_mb = status_mb("VmRSS")  # interpreter + libraries, before any model
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if method == "qlora":
        node = peft_node("qlora")
        model = AutoModelForCausalLM.from_pretrained(CACHE, quantization_config=quantization_config(node, "bf16-mixed"),
                                                     dtype=torch.bfloat16)
        model = apply_peft(model, node)
    else:
        fp32 = method == "lora_fp32"
        model = AutoModelForCausalLM.from_config(opt_config(), dtype=torch.float32 if fp32 else torch.bfloat16)
        if method in ("lora", "lora_fp32"):
            model = apply_peft(model, peft_node("lora"))
    build_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    load_peak = peak_mb()
    release_and_reset_peak()
    rss_built, anon_built, file_built = status_mb("VmRSS"), status_mb("RssAnon"), status_mb("RssFile")
    ids = torch.randint(3, 50000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=method != "lora_fp32"):
            if loss_chunk:  # llmlab's lm_training_step with stage.module.loss_chunk_tokens=loss_chunk
                hidden, head = forward_hidden(model, {"input_ids": ids})
                loss_sum, n = chunked_causal_lm_loss_sum(hidden, head, ids, loss_chunk)
            else:  # ... with loss_chunk_tokens=null: the full logits
                loss_sum, n = causal_lm_loss_sum(forward_logits(model, {"input_ids": ids}), ids)
            loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = times[-1]
    step_peak = status_mb("VmHWM")
    precision = {"qlora": "bf16-mixed", "lora_fp32": "32-true"}.get(method, "bf16-true")
    est = estimate(model, precision=precision, batch_size=batch,
                   seq_len=seq, optimizer_target="torch.optim.AdamW",
                   gradient_checkpointing=method == "qlora", loss_chunk_tokens=loss_chunk)
    return {"method": method, "loss_chunk_tokens": loss_chunk, "step_peak_rss_mb": round(step_peak, 1),
            "rss_before_step_mb": round(rss_built, 1),
            "anon_before_step_mb": round(anon_built, 1), "file_before_step_mb": round(file_built, 1),
            "load_peak_rss_mb": round(load_peak, 1), "libraries_rss_mb": round(libraries_mb, 1),
            "trainable_params": sum(p.numel() for p in params), "loss": round(loss.item(), 4),
            "build_s": round(build_s, 1), "step_s": round(step_s, 2), "step_times_s": [round(t, 2) for t in times],
            "estimate_total_gib": est["total_gib"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--loss-chunk", type=int, default=None,
                        help="the loss as stage.module.loss_chunk_tokens=N (default: from the full logits)")
    parser.add_argument("--live", action="store_true",
                        help="glibc returns freed blocks >= 128 KiB to the OS at once (MALLOC_MMAP_THRESHOLD_), "
                             "so the peak RSS tracks live memory rather than the allocator's high-water mark")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.batch, args.seq, args.steps, args.loss_chunk)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    methods = args.methods.split(",")
    if "qlora" in methods:
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); from bench.peft_memory import "
                        "ensure_checkpoint; ensure_checkpoint()" % str(ROOT)], check=True, cwd=ROOT)
    env = dict(os.environ)
    if args.live:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results = []
    for m in methods:
        chunk = ["--loss-chunk", str(args.loss_chunk)] if args.loss_chunk else []
        proc = subprocess.run([sys.executable, __file__, "--worker", m, "--seq", str(args.seq), "--batch",
                               str(args.batch), "--steps", str(args.steps), *chunk],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["method"]: r for r in results}
    if "lora" in by and "qlora" in by:
        q, l = by["qlora"], by["lora"]
        less_libraries = ((q["step_peak_rss_mb"] - q["libraries_rss_mb"])
                          / (l["step_peak_rss_mb"] - l["libraries_rss_mb"]))
        print(f"qlora/lora step peak RSS: {q['step_peak_rss_mb'] / l['step_peak_rss_mb']:.3f}; "
              f"RSS before qlora's step / lora's step peak: {q['rss_before_step_mb'] / l['step_peak_rss_mb']:.3f}; "
              f"less the libraries: {less_libraries:.3f}")
    if "lora" in by and "lora_fp32" in by:
        print(f"lora bf16 / fp32: step time {by['lora']['step_s'] / by['lora_fp32']['step_s']:.2f}x, "
              f"step peak RSS {by['lora']['step_peak_rss_mb'] / by['lora_fp32']['step_peak_rss_mb']:.2f}x")
    if "full" in by and "lora" in by:
        print(f"lora/full step peak RSS: {by['lora']['step_peak_rss_mb'] / by['full']['step_peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
