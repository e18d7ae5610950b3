"""The course's CPU deployment measurement: generation time of N new tokens, greedy and beam search,
int8 (llmlab's quantized export, saved and loaded back) vs unquantized fp32 and bf16; size on disk.

    OMP_NUM_THREADS=1 python bench/cpu_deploy.py [--arch opt125m|gpt2] [--new-tokens 256] [--beams 4]
        [--repeats 3] [--threads 1] [--variants fp32,bf16,int8] [--json out.json]

The model is the OPT-125M (or GPT-2 124M) architecture with random weights from its config (no weights
can be downloaded here); speed does not depend on the weight values. Every variant is exported to a
temporary directory and timed as loaded back (int8: `llmlab.models.quantize.load_quantized`), so the sizes are
on-disk sizes and the int8 timing is the deployed artifact's. Variants are interleaved within each
repeat (the machine is shared) and the median over repeats is reported; ratios are vs fp32 of this run.
Generation is forced to exactly N tokens (min_new_tokens=N). Extra in-memory variants to compare
libraries: `int8_head_fp32` (LM head left fp32, tied), `torchao_int8_dyn`, `torchao_int8_wo_bf16`.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(arch: str):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig() if arch == "opt125m" else GPT2Config()  # both defaults are the 125M/124M models
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def cpu_info() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "?").strip(), "cpus": fields.get("CPU(s)", "?").strip(),
            "bf16_flags": [f for f in flags if f in ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni",
                                                     "avx_vnni", "avx512_fp16")]}


def variants(base, names: list[str], tmp: Path) -> dict:
    """name -> (loader returning the model, size on disk in bytes or None)."""
    import copy

    import torch

    from llmlab.models.quantize import dir_size, load_quantized, quantize_int8, save_quantized

    out = {}
    for name in names:
        if name in ("fp32", "bf16"):
            d = tmp / name
            copy.deepcopy(base).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[name])).save_pretrained(d)
            from transformers import AutoModelForCausalLM

            out[name] = (lambda d=d: AutoModelForCausalLM.from_pretrained(d).eval(), dir_size(d))
        elif name == "int8":
            model, info = quantize_int8(copy.deepcopy(base))
            save_quantized(model, info, None, tmp / name)
            out[name] = (lambda: load_quantized(tmp / "int8"), dir_size(tmp / name) - (tmp / name / "README.md").stat().st_size)
        elif name == "int8_head_fp32":  # the tied LM head left unquantized (fp32)
            def head_fp32():
                m = copy.deepcopy(base)
                return torch.ao.quantization.quantize_dynamic(
                    m, {n: torch.ao.quantization.per_channel_dynamic_qconfig for n, mod in m.named_modules()
                        if type(mod) is torch.nn.Linear and mod is not m.get_output_embeddings()}, dtype=torch.qint8)
            out[name] = (head_fp32, None)
        elif name.startswith("torchao_"):
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

            cfg, dtype = {"torchao_int8_dyn": (Int8DynamicActivationInt8WeightConfig(), torch.float32),
                          "torchao_int8_wo_bf16": (Int8WeightOnlyConfig(), torch.bfloat16)}[name]

            def tao(cfg=cfg, dtype=dtype):
                m = copy.deepcopy(base).to(dtype)
                quantize_(m, cfg, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear))
                return m
            out[name] = (tao, None)
        else:
            raise SystemExit(f"unknown variant {name}")
    return out


def time_generate(model, prompt, new_tokens: int, beams: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared, oversubscribed machine the CPU time of a
    one-thread run is the steadier measure (wall time includes waiting for a core)."""
    import torch

    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=beams, pad_token_id=1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="opt125m", choices=["opt125m", "gpt2"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="fp32,bf16,int8")
    parser.add_argument("--modes", default="greedy,beam")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    modes = {"greedy": 1, "beam": args.beams}
    modes = {m: modes[m] for m in args.modes.split(",")}
    base = build(args.arch)
    prompt = torch.randint(4, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    times: dict = {(n, m): [] for n in names for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        made = variants(base, names, Path(tmp))
        models = {n: loader() for n, (loader, _) in made.items()}
        for model in models.values():  # warm-up (allocations, kernels)
            time_generate(model, prompt, 4, 1)
        for r in range(args.repeats):
            for mode, beams in modes.items():
                for n in names:
                    times[(n, mode)].append(time_generate(models[n], prompt, args.new_tokens, beams))
                    wall, cpu = times[(n, mode)][-1]
                    print(f"repeat {r} {mode:6s} {n:22s} wall {wall:7.2f} s  cpu {cpu:7.2f} s", flush=True)
        sizes = {n: s for n, (_, s) in made.items()}
    result = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "args": vars(args), "rows": []}
    print(f"\n{args.arch}, {args.new_tokens} new tokens, {args.prompt_tokens}-token prompt, {result['threads']} "
          f"thread(s), median of {args.repeats}; CPU {result['cpu']['model']} {result['cpu']['bf16_flags']}")
    print("| variant | size on disk | " + " | ".join(f"{m} CPU s | {m} speedup (CPU) | {m} wall s | {m} speedup (wall)"
                                                     for m in modes) + " |")
    for n in names:
        row = {"variant": n, "size_mib": None if sizes[n] is None else round(sizes[n] / 2**20, 1)}
        cells = []
        for m in modes:
            row[m] = {}
            for k, kind in ((1, "cpu"), (0, "wall")):
                med = statistics.median(t[k] for t in times[(n, m)])
                ref = statistics.median(t[k] for t in times[("fp32", m)]) if ("fp32", m) in times else float("nan")
                row[m][kind] = {"median_s": round(med, 2), "all_s": [round(t[k], 2) for t in times[(n, m)]],
                                "speedup_vs_fp32": round(ref / med, 2)}
                cells.append(f"{med:.2f} | {ref / med:.2f}x")
        result["rows"].append(row)
        size = "-" if row["size_mib"] is None else f"{row['size_mib']} MiB"
        print(f"| {n} | {size} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
