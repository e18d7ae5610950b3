"""Packed attention: mask memory and step time per way of passing document boundaries (issue 23 point 2).

One training step (forward + backward) of a small Llama on one packed row of T tokens holding documents of
random lengths, for each variant; each (variant, T) runs in a fresh process so its peak memory is its own.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/attention_mask.py                    # CPU: float, bool, document
    PYTHONPATH=. python bench/attention_mask.py --device cuda                        # + flash_attention_2, flex_attention
    PYTHONPATH=. python bench/attention_mask.py --lengths 2048 --variants bool --steps 1   # one cell

Variants (llmlab.models.attention's table): `float` sdpa with an additive fp32 (B,1,T,T) mask, `bool` sdpa with a
boolean one (llmlab's CPU path before this bench), `document` per-document SDPA calls (llmlab's CPU default now),
`flash_attention_2` cumulative lengths (CUDA, needs flash_attn), `flex_attention` a BlockMask. CUDA runs every
variant in bf16; the CPU in fp32. Peak memory: the process's peak RSS (CPU, one process per cell) or
torch.cuda.max_memory_allocated (CUDA, reset per cell; `--in-process`).
Prints a markdown table row per cell; `--out FILE` appends the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CPU_VARIANTS = ("float", "bool", "document")
CUDA_VARIANTS = ("float", "bool", "flash_attention_2", "flex_attention")


def document_segments(T: int, mean: int, seed: int, batch: int = 1):
    """Segment ids, positions (batch, T): documents of lengths uniform in [mean/4, 7 mean/4], each row's last cut
    at T (numbered from 0 in each row, as the packing collator does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    segs, poss = [], []
    for _ in range(batch):
        seg, pos, doc = [], [], 0
        while len(seg) < T:
            n = int(torch.randint(max(1, mean // 4), 7 * mean // 4 + 1, (1,), generator=g))
            seg += [doc] * n
            pos += list(range(n))
            doc += 1
        segs.append(seg[:T])
        poss.append(pos[:T])
    return torch.tensor(segs), torch.tensor(poss)


def one_cell(variant: str, T: int, device: str, steps: int, mean: int, layers: int, hidden: int, heads: int,
             batch: int = 1) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmlab.data.packing import block_causal_mask
    from llmlab.models.attention import (
        DOCUMENT_SDPA,
        flex_block_mask,
        register_document_sdpa,
        varlen_kwargs,
    )

    register_document_sdpa()
    impl = {"float": "sdpa", "bool": "sdpa", "document": DOCUMENT_SDPA}.get(variant, variant)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=512,
                         max_position_embeddings=T)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # every CUDA variant in bf16 (FlashAttention's)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl if impl != DOCUMENT_SDPA else "sdpa",
                                             dtype=dtype).to(device)
    model.config._attn_implementation = impl
    seg, pos = document_segments(T, mean, seed=T, batch=batch)
    seg, pos = seg.to(device), pos.to(device)
    ids = torch.randint(0, 512, (batch, T), device=device)  # (B, T)

    def boundaries():  # what the packed forward passes, built every step as training does
        if variant == "float":
            return {"attention_mask": block_causal_mask(seg, dtype)}  # additive, in the queries' dtype
        if variant == "bool":
            return {"attention_mask": block_causal_mask(seg, torch.bool)}
        if variant == "flex_attention":
            return {"attention_mask": flex_block_mask(seg)}
        return varlen_kwargs(seg)

    kw = boundaries()
    mask = kw.get("attention_mask")
    mask_bytes = mask.numel() * mask.element_size() if isinstance(mask, torch.Tensor) else (
        sum(t.numel() * t.element_size() for t in mask.as_tuple() if isinstance(t, torch.Tensor))
        if mask is not None else 8 * (kw["cu_seq_lens_q"].numel()))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, position_ids=pos, use_cache=False, **boundaries())
        out.logits.float().logsumexp(-1).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "T": T, "docs": int((seg.max(dim=1).values + 1).sum()), "mask_mib": mask_bytes / 2**20,
            "step_s": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--variants", default=None, help="comma list (default: all for the device)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (median reported)")
    p.add_argument("--mean-doc", type=int, default=512, help="mean document length in tokens")
    p.add_argument("--batch", type=int, default=1, help="packed rows per step")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--out", default=None, help="append the table rows to this file")
    p.add_argument("--in-process", action="store_true",
                   help="every cell in this process (CUDA: peak memory is reset per cell; faster start)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one cell in this process
    args = p.parse_args(argv)
    shape = dict(mean=args.mean_doc, layers=args.layers, hidden=args.hidden, heads=args.heads, batch=args.batch)
    if args.cell:
        variant, T = args.cell.split(":")
        print(json.dumps(one_cell(variant, int(T), args.device, args.steps, **shape)))
        return 0
    variants = args.variants.split(",") if args.variants else (CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    rows = [f"| B x T | variant | documents | mask MiB | step s (fwd+bwd) | peak {'CUDA alloc' if args.device == 'cuda' else 'RSS'} MiB |",
            "|---:|---|---:|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    for T in (int(x) for x in args.lengths.split(",")):
        for variant in variants:
            if args.in_process:
                try:
                    r, last = one_cell(variant, T, args.device, args.steps, **shape), None
                except Exception as err:
                    r, last = None, f"{type(err).__name__}: {err}".splitlines()[0]
            else:
                cmd = [sys.executable, __file__, "--cell", f"{variant}:{T}", "--device", args.device,
                       "--steps", str(args.steps), "--mean-doc", str(args.mean_doc), "--layers", str(args.layers),
                       "--hidden", str(args.hidden), "--heads", str(args.heads), "--batch", str(args.batch)]
                run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                r = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
                last = None if r else (run.stderr.strip().splitlines() or ["?"])[-1]
            if r is None:
                row = f"| {args.batch} x {T} | {variant} | - | - | failed: {last[:120]} | - |"
            else:
                row = (f"| {args.batch} x {T} | {variant} | {r['docs']} | {r['mask_mib']:.2f} | {r['step_s']:.3f} | "
                       f"{r['peak_mib']:.0f} |")
            rows.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
