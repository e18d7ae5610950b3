"""Where a training step's time goes on the 85M GPT-2 (issue 13 item 2), and what the attention mask costs.

`step` mode: the plain loop of bench/cpu_mfu.py (same model, packed blocks, batch 8 x 256, AdamW,
clipping, llmlab's non-finite guard) under torch.profiler for a few steps after one warm-up step.
Prints (a) the step's phases (record_function regions: data, mask, forward, loss, backward, clipping,
the guard's finite check, optimizer) and (b) self CPU time by op family (matmul, attention kernel,
softmax, GELU, LayerNorm, cross-entropy, elementwise/copies, ...). Lightning's own per-step cost is
not here: bench/cpu_mfu.py measures it as llmlab / plain loop.

`attention` mode: scaled_dot_product_attention at the model's shapes (8 x 12 heads x 256 x 64),
forward + backward, with the packed block-diagonal mask as llmlab passes it (dense additive float),
as a bool mask, with no mask and is_causal (what a single-document block could use), and per document
(one is_causal call per document: no dense mask), with the aten kernel each one dispatches to.

`gelu` mode: GPT-2's `gelu_new` (HF writes it as elementwise ops) vs `gelu_pytorch_tanh` (one kernel).

    .venv/bin/python bench/profile_step.py step [--precision 32] [--steps 2]
    .venv/bin/python bench/profile_step.py attention [--reps 5]   (then the gelu mode too)
    .venv/bin/python bench/profile_step.py gelu [--reps 5]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from cpu_mfu import MODEL, matmul_flops  # the 85M model's overrides; bench/ is on sys.path as this script's dir

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["data", "mask", "forward", "loss", "backward", "clip_grad", "finite_guard", "optimizer"]
FAMILIES = [  # (family, substrings of aten op names), first match wins
    ("attention (SDPA flash kernel, fwd+bwd)", ["flash_attention", "scaled_dot_product"]),
    ("matmul (addmm/mm/bmm)", ["addmm", "aten::mm", "bmm", "baddbmm"]),
    ("softmax / log_softmax / nll (loss)", ["softmax", "nll_loss"]),
    ("GELU", ["gelu"]),
    ("LayerNorm", ["layer_norm"]),
    ("AdamW math (foreach/fused/single-tensor ops)", ["_foreach", "_fused_adam", "lerp", "addcdiv", "addcmul", "sqrt"]),
    ("norms (clipping, finite guard)", ["norm", "isfinite"]),
    ("embedding", ["embedding"]),
    ("mask build (eq/tril/masked_fill)", ["masked_fill", "tril", "aten::eq", "aten::eye", "bitwise", "logical"]),
    ("copies / dtype casts", ["copy_", "aten::to", "_to_copy", "clone", "contiguous"]),
    ("elementwise (add/mul/div/...)", ["add", "mul", "div", "sub", "zero", "fill", "where", "pow"]),
]


def build(precision: str):
    """The 85M model, loader and AdamW as the plain loop builds them (bench/plain_loop.py)."""
    from plain_loop import build as build_plain

    _, model, loader, opt = build_plain(str(ROOT / "conf"), MODEL, precision)
    return model, loader, opt


def step_mode(args):
    import llmlab.stages.common as common
    from llmlab.losses import causal_lm_loss
    from llmlab.optim import grads_finite

    model, loader, opt = build(args.precision)
    mask_fn = common.block_causal_mask

    def timed_mask(*a, **k):  # the mask build as its own region, inside forward
        with record_function("mask"):
            return mask_fn(*a, **k)

    common.block_causal_mask = timed_mask
    it = iter(loader)

    def one_step():
        with record_function("data"):
            batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            with record_function("forward"):
                logits = common.forward_logits(model, batch, "document")
            with record_function("loss"):
                loss = causal_lm_loss(logits, batch["labels"])
        with record_function("backward"):
            loss.backward()
        with record_function("clip_grad"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with record_function("finite_guard"):
            grads_finite(opt)
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    one_step()  # warm-up (allocations, oneDNN primitive creation)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            one_step()
    wall = (time.perf_counter() - t) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e6
    print(f"precision {args.precision}, {args.steps} profiled steps, {wall:.2f} s/step wall (profiled), "
          f"self CPU time {total:.2f} s/step, threads {torch.get_num_threads()}")
    print("\n| phase | s/step | share |\n|---|---:|---:|")
    by_name = {e.key: e for e in events}
    for ph in PHASES:
        s = by_name[ph].cpu_time_total / args.steps / 1e6 if ph in by_name else 0.0
        print(f"| {ph}{' (inside forward)' if ph == 'mask' else ''} | {s:.3f} | {s / total:.1%} |")
    fam = defaultdict(float)
    for e in events:
        if e.key in PHASES or not e.key.startswith("aten::"):
            continue
        name = next((f for f, subs in FAMILIES if any(x in e.key for x in subs)), "other aten ops")
        fam[name] += e.self_cpu_time_total / args.steps / 1e6
    print("\n| op family (self CPU time) | s/step | share |\n|---|---:|---:|")
    for name, s in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s:.3f} | {s / total:.1%} |")
    print("\ntop 15 aten ops by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.key:55s} {e.self_cpu_time_total / args.steps / 1e6:7.3f} s/step  x{e.count // args.steps}")


def attention_mode(args):
    from llmlab.data.packing import block_causal_mask

    B, H, T, D = 8, 12, 256, 64
    # a realistic packing: the first block of the built-in data's segment ids would do, but fixed
    # boundaries keep this reproducible: 3 documents per row (~85 tokens each)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[:, 85:] = 1
    seg[:, 170:] = 2
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = [torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3)]
        additive = block_causal_mask(seg, dtype)  # (B, 1, T, T), as forward_logits passes it
        allowed = additive == 0

        def per_document():
            outs = []
            for start, end in ((0, 85), (85, 170), (170, T)):
                sl = slice(start, end)
                outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True))
            return torch.cat(outs, dim=2)

        variants = {"dense additive float mask (llmlab today)": lambda: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=additive),
                    "bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
                    "no mask, is_causal (one document per row only)": lambda: F.scaled_dot_product_attention(
                        q, k, v, is_causal=True),
                    "per document, is_causal each (no dense mask)": per_document}
        ref = variants["dense additive float mask (llmlab today)"]().detach().float()
        print(f"\n{dtype}: B={B} H={H} T={T} D={D}, 3 documents per row, forward+backward, median of {args.reps}")
        print("| variant | ms fwd+bwd | kernel | max abs diff vs llmlab's |\n|---|---:|---|---:|")
        for name, fn in variants.items():
            for _ in range(2):
                fn().sum().backward()
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                fn().sum().backward()
                times.append(time.perf_counter() - t)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = fn()
            kernels = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot")
                              or "attention_math" in e.key or e.key == "aten::_softmax"})
            diff = (out.detach().float() - ref).abs().max().item()
            if "is_causal (one" in name:
                diff = float("nan")  # a different mask: not comparable on multi-document rows
            print(f"| {name} | {sorted(times)[len(times) // 2] * 1e3:.1f} | {', '.join(kernels)} | {diff:.2e} |")
    gelu_mode(args)


def gelu_mode(args):
    """GPT-2's activation as HF builds it: `gelu_new` (tanh GELU written as ~8 elementwise torch ops) vs
    `gelu_pytorch_tanh` (one fused aten::gelu(approximate="tanh") kernel): the same function."""
    from transformers.activations import ACT2FN

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 256, 3072, dtype=dtype, requires_grad=True)  # the MLP's hidden activations
        ref = ACT2FN["gelu_new"](x).detach().float()
        print(f"\n{dtype}: GELU on (8, 256, 3072), forward+backward, median of {args.reps} (x12 layers per step)")
        print("| activation_function | ms fwd+bwd | max abs diff vs gelu_new |\n|---|---:|---:|")
        for name in ("gelu_new", "gelu_pytorch_tanh"):
            fn = ACT2FN[name]
            for _ in range(2):
                fn(x).sum().backward()
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                fn(x).sum().backward()
                times.append(time.perf_counter() - t)
            diff = (fn(x).detach().float() - ref).abs().max().item()
            print(f"| {name} | {sorted(times)[len(times) // 2] * 1e3:.1f} | {diff:.2e} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["step", "attention", "gelu"])
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "bf16-true"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import os

    flops = {name: matmul_flops(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"load {os.getloadavg()}; 2048^2 matmul best wall / CPU-time GFLOP/s: "
          + ", ".join(f"{k} {w / 1e9:.1f} / {c / 1e9:.1f}" for k, (w, c) in flops.items()))
    {"step": step_mode, "attention": attention_mode, "gelu": gelu_mode}[args.mode](args)


if __name__ == "__main__":
    main()
