"""GGUF deployment measurement: generation speed of N new tokens, greedy, batch 1, at 1 and 2 threads:
PyTorch fp32, bf16 and llmlab's int8 export vs llama.cpp (llama-cpp-python) f16, q8_0 and q4_k_m files
written by `llmlab.models.gguf.convert` (what `python -m llmlab.export ... format=gguf` runs); sizes on disk.

    python bench/gguf_deploy.py [--layers 12 --width 768 ...] [--new-tokens 256] [--threads 1,2] [--repeats 2]

The model is a Llama architecture with random weights (nothing can be downloaded here; speed does not depend on
the values), vocabulary 32,000 (as Llama 2) over a byte-level BPE trained here (the converter pads the rest).
Every variant is the exported artifact loaded back. PyTorch: transformers' generate with min_new_tokens=N;
llama.cpp: its own decode loop, one token at a time, argmax of its logits (tests/test_gguf.py checks that this
greedy equals transformers'). Variants are interleaved within each repeat (the machine is shared); the median is
reported, with the process's CPU seconds (per token) and the 1-minute load average beside the wall seconds (on an oversubscribed machine the CPU time of
a one-thread run is the steadier measure; at 2 threads it is the sum over both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_deploy import cpu_info  # noqa: E402

TORCH = ("fp32", "bf16", "int8", "ao_int8wo", "ao_int8dyn")
# torchao 0.18 through transformers' TorchAoConfig, saved with save_pretrained and loaded back by a plain
# from_pretrained(dir) (the standard-loader candidate of issue 24, point 3)
TORCHAO = {"ao_int8wo": "Int8WeightOnlyConfig", "ao_int8dyn": "Int8DynamicActivationInt8WeightConfig"}
GGUF = ("f16", "q8_0", "q4_k_m")


def build(out: Path, layers: int, width: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.gguf_models import bpe_tokenizer

    tok = bpe_tokenizer("llama", vocab_size=4096)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(TORCH + GGUF))
    parser.add_argument("--json", default=None)
    parser.add_argument("--sizes-only", action="store_true", help="export every variant, print sizes, no timing")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from llmlab.models.gguf import GGUF_FILE, convert, greedy, load_gguf
    from llmlab.models.quantize import dir_size, load_quantized, quantize_int8, save_quantized

    names = args.variants.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    prompt = torch.randint(300, 4000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    times = {(n, t): [] for n in names for t in threads}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = build(tmp / "fp32", args.layers, args.width, args.heads, args.kv_heads, args.ffn, args.vocab)
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
        sizes, loaders = {}, {}
        for n in names:
            if n == "fp32":
                sizes[n], loaders[n] = dir_size(src), lambda: AutoModelForCausalLM.from_pretrained(src).eval()
            elif n == "bf16":
                AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp / "bf16")
                sizes[n] = dir_size(tmp / "bf16")
                loaders[n] = lambda: AutoModelForCausalLM.from_pretrained(tmp / "bf16", dtype=torch.bfloat16).eval()
            elif n == "int8":
                model, info = quantize_int8(AutoModelForCausalLM.from_pretrained(src))
                save_quantized(model, info, None, tmp / "int8")
                sizes[n] = (tmp / "int8" / "model.safetensors").stat().st_size
                loaders[n] = lambda: load_quantized(tmp / "int8")
            elif n in TORCHAO:
                import torchao.quantization
                from transformers import TorchAoConfig

                config = TorchAoConfig(getattr(torchao.quantization, TORCHAO[n])())
                AutoModelForCausalLM.from_pretrained(src, quantization_config=config).save_pretrained(tmp / n)
                sizes[n] = dir_size(tmp / n)
                loaders[n] = lambda n=n: AutoModelForCausalLM.from_pretrained(tmp / n).eval()
            else:
                start = time.perf_counter()
                convert(src, tmp / f"gguf-{n}", n)
                print(f"converted {n} in {time.perf_counter() - start:.0f} s", flush=True)
                sizes[n] = (tmp / f"gguf-{n}" / GGUF_FILE).stat().st_size
        ids = prompt[0].tolist()
        if args.sizes_only:
            print(f"{n_params / 1e6:.1f}M parameters; sizes: " +
                  ", ".join(f"{n} {sizes[n] / 2**20:.1f} MiB" for n in names))
            return

        tokens = {}  # variant -> its greedy tokens (the last run's)

        def run(n: str, t: int, new: int) -> tuple[float, float, float]:
            load = os.getloadavg()[0]  # the machine is shared: the 1-minute load beside each number
            wall, cpu = time.perf_counter(), time.process_time()
            if n in GGUF:
                tokens[n] = greedy(models[n, t], ids, new)
                assert len(tokens[n]) == new
            else:
                torch.set_num_threads(t)
                with torch.no_grad():
                    out = models[n, t].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                min_new_tokens=new, do_sample=False, pad_token_id=0)
                assert out.shape[1] == prompt.shape[1] + new
                tokens[n] = out[0, prompt.shape[1]:].tolist()
            return time.perf_counter() - wall, time.process_time() - cpu, load

        models = {}
        for t in threads:
            for n in names:
                models[n, t] = load_gguf(tmp / f"gguf-{n}", n_ctx=512, threads=t) if n in GGUF else \
                    (models.get((n, threads[0])) or loaders[n]())
                run(n, t, 4)  # warm-up
        for r in range(args.repeats):
            for t in threads:
                for n in names:
                    times[n, t].append(run(n, t, args.new_tokens))
                    wall, cpu, load = times[n, t][-1]
                    same = next((i for i, (a, b) in enumerate(zip(tokens[n], tokens.get("fp32", []))) if a != b),
                                len(tokens[n]))
                    print(f"repeat {r} threads {t} {n:10s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  "
                          f"{args.new_tokens / wall:6.1f} tok/s  {1000 * cpu / args.new_tokens:6.1f} CPU ms/tok  "
                          f"load {load:.1f}  greedy = fp32 for {same} tokens", flush=True)
    result = {"cpu": cpu_info(), "torch": torch.__version__, "params": n_params, "args": vars(args), "rows": []}
    print(f"\nLlama {args.layers} x {args.width} (ffn {args.ffn}, {args.heads} heads / {args.kv_heads} kv, vocab "
          f"{args.vocab}): {n_params / 1e6:.1f}M parameters; {args.new_tokens} new tokens greedy after a "
          f"{args.prompt_tokens}-token prompt, median of {args.repeats}; CPU {result['cpu']['model']} "
          f"{result['cpu']['bf16_flags']}")
    print("| variant | size on disk | greedy = fp32 (tokens) | " + " | ".join(
        f"{t} thr tok/s (wall) | {t} thr CPU ms/tok | {t} thr load | {t} thr vs fp32 (CPU)" for t in threads) + " |")
    print("|---|---|---|" + "---|---|---|---|" * len(threads))
    for n in names:
        same = next((i for i, (a, b) in enumerate(zip(tokens[n], tokens.get("fp32", []))) if a != b), len(tokens[n]))
        cells, row = [], {"variant": n, "size_mib": round(sizes[n] / 2**20, 1), "greedy_equal_fp32": same}
        for t in threads:
            wall = statistics.median(x[0] for x in times[n, t])
            cpu = statistics.median(x[1] for x in times[n, t])
            load = statistics.median(x[2] for x in times[n, t])
            ref = statistics.median(x[1] for x in times["fp32", t]) if ("fp32", t) in times else float("nan")
            row[f"threads_{t}"] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": round(load, 1),
                                   "tok_per_s": round(args.new_tokens / wall, 1), "all": times[n, t]}
            cells.append(f"{args.new_tokens / wall:.1f} | {1000 * cpu / args.new_tokens:.1f} | {load:.1f} | "
                         f"{ref / cpu:.2f}x")
        result["rows"].append(row)
        print(f"| {n} | {row['size_mib']} MiB | {same}/{args.new_tokens} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
