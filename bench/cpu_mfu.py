"""CPU MFU: training tokens/s on the 85M GPT-2 against this machine's own 2,048^2 matmul FLOP/s (issue 13).

One invocation measures, with the same thread count throughout:
- the 2,048^2 matmul FLOP/s at fp32 and bf16 (re-measured before every training run, median reported,
  so load changes during the run show up as spread rather than bias);
- llmlab's training tokens/s (`python -m llmlab.run`, the issue's command) on the 85M GPT-2
  (12 x 768, byte vocabulary, batch 8 x 256) at precision 32 / bf16-mixed / bf16-true / strategy=cpu_bf16;
- a plain PyTorch loop's tokens/s on the same model, packed blocks, batch, AdamW, clipping, schedule and
  precision (autocast for bf16-mixed and cpu_bf16, a bf16 model for bf16-true).
MFU = 6 x params x tokens/s / matmul FLOP/s of the precision's compute dtype (fp32 for 32, bf16 otherwise).
Both sides time every step but the first (llmlab's RunSummary rule). Runs alternate llmlab / plain per
precision so machine noise hits both; ratios are taken within a pair.

    .venv/bin/python bench/cpu_mfu.py [--threads 1] [--steps 5] [--repeats 1] [--precisions 32,bf16-mixed,...]
    extra variants (fast paths): --variants llmlab_fused,llmlab_fast,llmlab_compile,plain_fused,plain_compile
    torch.compile, llmlab's option against the plain loop's, eager and compiled in one invocation:
    --precisions 32 --variants llmlab,llmlab_compile,plain,plain_compile (the compile happens in the
    untimed first step; validation is off here, so no second graph is compiled inside the timed steps)
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

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.config.n_layer=12", "model.config.n_embd=768", "model.config.n_head=12",
         "data.block_size=256", "data.batch_size=8", "data.n_train=2000"]
QUIET = ["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
         "callbacks.samples=null", "callbacks.hf_export=null", "callbacks.model_checkpoint=null", "logger=csv"]
# precision -> (llmlab overrides, plain-loop mode, compute dtype for the MFU denominator)
PRECISIONS = {
    "32": (["precision=32"], "32", "fp32"),
    "bf16-mixed": (["precision=bf16-mixed"], "bf16-mixed", "bf16"),
    "bf16-true": (["precision=bf16-true"], "bf16-true", "bf16"),
    "cpu_bf16": (["strategy=cpu_bf16"], "bf16-mixed", "bf16"),
}


FUSED = "stage.module.optimizer.fused=true"
# llmlab variant -> its overrides (the plain loop's variants are bench/plain_loop.py's VARIANT argument)
LLMLAB_VARIANTS = {"llmlab": [], "llmlab_fused": [FUSED],
                   "llmlab_fast": [FUSED, "+model.config.activation_function=gelu_pytorch_tanh"],
                   "llmlab_compile": ["compile=true"]}  # conf/train.yaml `compile`: the model's forward via inductor


def cpu_info() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "?").strip(), "family/model": f"{fields.get('CPU family', '?').strip()}/"
            f"{fields.get('Model', '?').strip()}", "bf16 features": [f for f in flags if "amx" in f or "bf16" in f]}


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> tuple[float, float]:
    """(wall, CPU-time) FLOP/s: best of `reps` timed 2,048^2 matmuls after 2 warm-ups (best = least
    disturbed by other jobs; CPU time is this process's, for the CPU-time MFU)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    wall = cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * n ** 3 / wall, 2 * n ** 3 / cpu


def env(threads: int) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": path}


def llmlab_run(steps: int, precision: str, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cpu_file = Path(d) / "cputime.json"
        cmd = [sys.executable, "-m", "llmlab.run", *MODEL, *QUIET, *PRECISIONS[precision][0], *extra,
               f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"hydra.run.dir={d}",
               "+callbacks.cputime._target_=cputime.StepCPUTime", f"+callbacks.cputime.path={cpu_file}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env(threads))
        s, c = json.loads((Path(d) / "summary.json").read_text()), json.loads(cpu_file.read_text())
        # RunSummary's tokens/s over the same timed steps, rescaled from wall to CPU seconds
        return {"tokens_per_sec": s["tokens_per_sec"], "params": s["total_params"],
                "tokens_per_cpu_sec": s["tokens_per_sec"] * c["wall_seconds"] / c["cpu_seconds"]}


def plain_run(steps: int, precision: str, threads: int, variant: str = "plain") -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plain_loop.py"), str(steps), PRECISIONS[precision][1],
                          variant, str(ROOT / "conf"), *MODEL], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=env(threads))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run; the first is not timed")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precisions", default="32,bf16-mixed,bf16-true,cpu_bf16")
    ap.add_argument("--variants", default="llmlab,plain",
                    help="comma list of llmlab, plain, llmlab_fused (AdamW fused=True), llmlab_fast (fused AdamW + "
                         "gelu_pytorch_tanh), llmlab_compile (compile=true), plain_fused, plain_compile")
    ap.add_argument("--tiny", action="store_true", help="smoke test: conf model=tiny at its default batch and block")
    args = ap.parse_args()
    if args.tiny:
        MODEL[:] = ["data.n_train=2000"]
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"CPU: {info['model']} (family/model {info['family/model']}); bf16 features: {info['bf16 features']}; "
          f"threads {args.threads}; torch {torch.__version__}; load {os.getloadavg()}", flush=True)
    mm = {"fp32": [], "bf16": [], "fp32_cpu": [], "bf16_cpu": []}
    rows: dict = {}
    params = None
    t0 = time.time()
    for r in range(args.repeats):
        for p in args.precisions.split(","):
            for v in args.variants.split(","):
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    wall, cpu = matmul_flops(dtype)
                    mm[name].append(wall)
                    mm[name + "_cpu"].append(cpu)
                try:
                    if v.startswith("llmlab"):
                        res = llmlab_run(args.steps, p, args.threads, LLMLAB_VARIANTS[v])
                    else:
                        res = plain_run(args.steps, p, args.threads, v)
                except subprocess.CalledProcessError as e:  # a failing variant is a result too: say it, go on
                    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                    print(f"repeat {r} {p} {v}: FAILED: {err.strip().splitlines()[-1:] or e}", flush=True)
                    continue
                params = res["params"]
                rows.setdefault((p, v), []).append(res)
                print(f"repeat {r} {p:10s} {v:14s} {res['tokens_per_sec']:7.1f} tok/s, "
                      f"{res['tokens_per_cpu_sec']:7.1f} tok/CPU-s  losses {res.get('losses', '')}  "
                      f"(matmul fp32 {mm['fp32'][-1] / 1e9:.1f}, bf16 {mm['bf16'][-1] / 1e9:.1f} GFLOP/s; "
                      f"load {os.getloadavg()[0]:.2f})", flush=True)
    fl = {k: statistics.median(v) for k, v in mm.items()}
    print(f"\n{time.time() - t0:.0f} s; params {params:,}; matmul 2048^2 median fp32 {fl['fp32'] / 1e9:.1f} GFLOP/s "
          f"(range {min(mm['fp32']) / 1e9:.1f}-{max(mm['fp32']) / 1e9:.1f}), bf16 {fl['bf16'] / 1e9:.1f} "
          f"(range {min(mm['bf16']) / 1e9:.1f}-{max(mm['bf16']) / 1e9:.1f}); bf16/fp32 matmul "
          f"{fl['bf16'] / fl['fp32']:.2f}x; by CPU time fp32 {fl['fp32_cpu'] / 1e9:.1f}, "
          f"bf16 {fl['bf16_cpu'] / 1e9:.1f} ({fl['bf16_cpu'] / fl['fp32_cpu']:.2f}x); load now {os.getloadavg()}")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tokens_per_sec", "tokens_per_cpu_sec")}
           for k, v in rows.items()}
    print("| precision | variant | tok/s wall | tok/CPU-s | MFU wall | MFU CPU-time |")
    print("|---|---|---:|---:|---:|---:|")
    for (p, v), m in med.items():
        dt = PRECISIONS[p][2]
        print(f"| {p} | {v} | {m['tokens_per_sec']:.1f} | {m['tokens_per_cpu_sec']:.1f} | "
              f"{6 * params * m['tokens_per_sec'] / fl[dt]:.2f} | "
              f"{6 * params * m['tokens_per_cpu_sec'] / fl[dt + '_cpu']:.2f} |")

    def ratio(a, b, key):  # median of paired ratios (same repeat)
        return statistics.median(x[key] / y[key] for x, y in zip(rows[a], rows[b]))

    for p in args.precisions.split(","):
        for v in args.variants.split(","):
            base = "llmlab" if v.startswith("llmlab") else "plain"
            if v != base and (p, v) in rows and (p, base) in rows:
                print(f"{v} / {base} at {p}: wall {ratio((p, v), (p, base), 'tokens_per_sec'):.2f}x, "
                      f"CPU {ratio((p, v), (p, base), 'tokens_per_cpu_sec'):.2f}x")
            twin = "plain" + v.removeprefix("llmlab")  # llmlab_compile vs plain_compile: same fast path, both sides
            if v.startswith("llmlab_") and (p, v) in rows and (p, twin) in rows:
                print(f"{v} / {twin} at {p}: wall {ratio((p, v), (p, twin), 'tokens_per_sec'):.2f}x, "
                      f"CPU {ratio((p, v), (p, twin), 'tokens_per_cpu_sec'):.2f}x")
        if (p, "llmlab") in rows and (p, "plain") in rows:
            print(f"llmlab / plain at {p}: wall {ratio((p, 'llmlab'), (p, 'plain'), 'tokens_per_sec'):.2f}x, "
                  f"CPU {ratio((p, 'llmlab'), (p, 'plain'), 'tokens_per_cpu_sec'):.2f}x")
        if p != "32" and (p, "llmlab") in rows and ("32", "llmlab") in rows:
            print(f"llmlab {p} / fp32: wall {ratio((p, 'llmlab'), ('32', 'llmlab'), 'tokens_per_sec'):.2f}x, "
                  f"CPU {ratio((p, 'llmlab'), ('32', 'llmlab'), 'tokens_per_cpu_sec'):.2f}x "
                  f"(target 0.85 x matmul ratio = {0.85 * fl['bf16'] / fl['fp32']:.2f}x)")

if __name__ == "__main__":
    main()
