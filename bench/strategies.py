"""Strategy benchmarks, all through the real `python -m llmlab.run` on this CPU machine.

    .venv/bin/python bench/strategies.py ddp_scaling   # 1 process vs 2 DDP processes: tokens/s, scaling ratio
    .venv/bin/python bench/strategies.py zero_memory   # DDP vs ZeRO 1/2/3: step time, per-process peak memory
    .venv/bin/python bench/strategies.py cpu_bf16      # strategy=cpu_bf16 vs fp32, same model: tokens/s ratio
    .venv/bin/python bench/strategies.py all --append  # all three, results appended to bench/RESULTS.md

Every measurement is its own `llmlab.run` subprocess (fixed seed and data); a `MemoryProbe` callback
(added with `+callbacks.probe`) records in each rank: the time of each optimizer step, the resident
memory at the start of training (model built, strategy set up) and, per step, the peak resident memory
of forward+backward and of the optimizer step (Linux VmHWM, reset at each batch start and after each
backward; model building does not count).
Compared variants alternate within one invocation and ratios are taken between neighbours, because
this 2-core machine is shared and its load drifts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from llmlab.distributed.memory import release_and_reset_peak, reset_peak, status_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
QUIET = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
         "callbacks.samples.prompts=[]", "callbacks.hf_export=null", "callbacks.model_checkpoint=null",
         "+trainer.enable_checkpointing=false", "trainer.log_every_n_steps=1"]


# --------------------------------------------------------------------------------------------------
# The probe (runs inside each rank of llmlab.run)
# --------------------------------------------------------------------------------------------------


class MemoryProbe(L.Callback):
    """Per rank -> JSON: optimizer-step times, RSS when training starts, and per step the peak RSS of
    forward+backward (ZeRO's gradient reduction runs in backward) and of the rest of the step (the
    optimizer step, ZeRO's update of its partition and the all-gather of the new weights)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.times: list[float] = []
        self.phases: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        # memory freed during setup (e.g. the full model before ZeRO-3 partitioned it) goes back to the
        # OS, and model building and setup do not count as training's peak
        release_and_reset_peak()
        self.start_rss_mb = status_mb("VmRSS")
        self._t = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        reset_peak()
        self._phase = {}

    def on_after_backward(self, trainer, pl_module):
        self._phase.update(fwd_bwd_peak_mb=status_mb("VmHWM"), after_backward_rss_mb=status_mb("VmRSS"))
        reset_peak()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self._t = now
        self._phase.update(step_peak_mb=status_mb("VmHWM"), end_rss_mb=status_mb("VmRSS"))
        self.phases.append(self._phase)

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        peaks = [v for ph in self.phases for k, v in ph.items() if k.endswith("_peak_mb")]
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "step_seconds": self.times,
            "start_rss_mb": self.start_rss_mb,
            "train_peak_rss_mb": max(peaks, default=status_mb("VmHWM")),
            "phases": self.phases,
            "end_rss_mb": status_mb("VmRSS"),
            # ZeRO-3 leaves each parameter an empty placeholder; ds_numel is its real size
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.model.parameters()),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------


# glibc keeps freed heap memory and raises its mmap threshold as large blocks come and go, so RSS can
# report memory a process no longer uses. With a fixed 128 KiB threshold every tensor of note is its
# own mapping, returned to the OS when freed: RSS then tracks live memory (all variants alike).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _env(threads: int | None) -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONWARNINGS"] = "ignore"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run(overrides: list[str], threads: int | None = None, timeout: int = 1800) -> dict:
    """One llmlab.run; returns its summary.json plus the probe's per-rank records and the wall time."""
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        cmd = [sys.executable, "-m", "llmlab.run", *QUIET, *overrides,
               "+callbacks.probe._target_=bench.strategies.MemoryProbe", f"+callbacks.probe.out={probe}",
               f"hydra.run.dir={d}/run"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(overrides)}\n{proc.stderr[-4000:]}")
        summary = json.loads((Path(d) / "run" / "summary.json").read_text())
        ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    return {"summary": summary, "ranks": ranks, "wall": time.time() - t0, "overrides": overrides}


def steady_step(result: dict, skip: int = 1) -> float:
    """Median optimizer-step time after the first `skip` steps, slowest rank (the ranks wait for it)."""
    return max(statistics.median(r["step_seconds"][skip:]) for r in result["ranks"])


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _machine(load_before: str) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores; `uptime` load average (1/5/15 min) "
            f"{load_before} before, {_load()} after (shared machine: other engineers' jobs were running)")


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------

# ~23M parameters (6 layers, 512 wide): the ENVIRONMENT.md reference model
MID = ["model.config.n_layer=6", "model.config.n_embd=512", "model.config.n_head=8", "data.block_size=256",
       "data.n_train=4000"]


def paired_tokens_per_sec(repeats: int, base, variant, header: str) -> str:
    """Alternating pairs of two runs (callables returning `run` results); a markdown table of their
    tokens/s with the ratio variant / base per pair and the median ratio."""
    rows, ratios = [], []
    for i in range(repeats):
        first, second = (base, variant) if i % 2 == 0 else (variant, base)  # alternate which runs first
        got = {id(f): f() for f in (first, second)}
        a, b = got[id(base)]["summary"]["tokens_per_sec"], got[id(variant)]["summary"]["tokens_per_sec"]
        rows.append((a, b))
        ratios.append(b / a)
    lines = [
        header,
        "|---|---|---|---|",
        *[f"| {i + 1} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |" for i, (a, b) in enumerate(rows)],
        f"| median | | | **{statistics.median(ratios):.2f}x** |",
    ]
    return "\n".join(lines)


def ddp_scaling(steps: int, repeats: int) -> str:
    """Same per-process batch: 1 process (torch's 2 threads) vs 2 DDP processes (1 thread each)."""
    common = [*MID, "data.batch_size=8", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    return paired_tokens_per_sec(
        repeats, lambda: run([*common, "strategy=auto"]),
        lambda: run([*common, "strategy=ddp", "trainer.devices=2"], threads=1),
        "| run | 1 process (2 threads) tokens/s | 2 DDP processes (1 thread each) tokens/s | scaling (2 / 1) |")


# ~200M parameters: GPT-2 layout, 16 layers x 1024 wide (vocabulary of the builtin tokenizer)
BIG = ["model.config.n_layer=16", "model.config.n_embd=1024", "model.config.n_head=16", "model.config.n_positions=128",
       "data.block_size=128", "data.batch_size=2", "data.n_train=400"]


# DeepSpeed as shipped in conf/strategy/zero*.yaml is tuned for throughput on GPUs: 200M-element
# reduce buckets, double-buffered with overlap_comm (2 x 800 MB in fp32), and ZeRO-3 keeps gathered
# parameters alive while they are re-used within 1e9 elements (stage3_max_reuse_distance), i.e. the whole
# forward of a 200M model stays gathered until backward. At this model size those buffers are as large as
# what sharding saves. These overrides make the buffers small so that the sharding itself shows.
SMALL_BUFFERS = [
    "strategy.reduce_bucket_size=5000000", "strategy.allgather_bucket_size=5000000", "strategy.overlap_comm=false",
    "++strategy.config_overrides.zero_optimization.stage3_prefetch_bucket_size=5000000",
    "++strategy.config_overrides.zero_optimization.stage3_max_live_parameters=10000000",
    "++strategy.config_overrides.zero_optimization.stage3_max_reuse_distance=0",
]
# fp32 + AdamW, bytes per parameter per process with N=2, as DeepSpeed 0.19 lays it out: weights 4,
# gradients 4, Adam states 8, and for ZeRO-1/2 an fp32 master copy of the own partition (4/N; stage_1_and_2
# clones it even when the model is already fp32; stage 3 shares it when the dtypes match).
TEXTBOOK = {"ddp": 4 + 4 + 8, "zero1": 4 + 4 + (4 + 8) / 2, "zero2": 4 + (4 + 4 + 8) / 2, "zero3": (4 + 4 + 8) / 2}


def zero_memory(steps: int, strategies: list[str], extra: list[str], ds_extra: list[str]) -> tuple[str, dict]:
    results = {}
    for name in strategies:
        more = ds_extra if name.startswith("zero") else []
        results[name] = run([*BIG, f"strategy={name}", "trainer.devices=2", f"trainer.max_steps={steps}",
                             f"trainer.val_check_interval={steps}", *extra, *more], threads=1)
    params = results[strategies[0]]["summary"]["total_params"]
    base = results.get("ddp") or results[strategies[0]]
    base_mem = max(r["train_peak_rss_mb"] for r in base["ranks"])
    base_step = steady_step(base)
    lines = ["| strategy | step time (s) | vs ddp | states / process, fp32 layout (MB) | RSS at train start (MB) "
             "| peak RSS in training (MB) | vs ddp | vs previous | peak in fwd+bwd (MB) | RSS after backward (MB) "
             "| peak in optimizer step (MB) | RSS after training (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peaks, prev = {}, None
    for name, r in results.items():
        peak = max(x["train_peak_rss_mb"] for x in r["ranks"])
        start = max(x["start_rss_mb"] for x in r["ranks"])
        end = max(x.get("end_rss_mb", 0) for x in r["ranks"])
        step = steady_step(r)
        peaks[name] = peak
        book = f"{TEXTBOOK[name] * params / 2**20:,.0f}" if name in TEXTBOOK else "-"
        vs_prev = f"{peak / prev:.2f}x" if prev else "-"
        def phase(key: str) -> str:  # the larger rank, the largest step (steps after the first in brackets)
            every = [max(ph.get(key, 0) for ph in x["phases"]) for x in r["ranks"] if x.get("phases")]
            later = [max((ph.get(key, 0) for ph in x["phases"][1:]), default=0) for x in r["ranks"] if x.get("phases")]
            return f"{max(every):,.0f} ({max(later):,.0f})" if every else "-"

        lines.append(f"| {name} | {step:.2f} | {step / base_step:.2f}x | {book} | {start:,.0f} | {peak:,.0f} | "
                     f"{peak / base_mem:.2f}x | {vs_prev} | {phase('fwd_bwd_peak_mb')} | "
                     f"{phase('after_backward_rss_mb')} | {phase('step_peak_mb')} | {end:,.0f} |")
        prev = peak
    return "\n".join(lines), {"params": params, "peaks": peaks}


def cpu_bf16(steps: int, repeats: int) -> str:
    common = [*MID, "data.batch_size=8", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    return paired_tokens_per_sec(
        repeats, lambda: run([*common, "strategy=auto", "precision=32"]), lambda: run([*common, "strategy=cpu_bf16"]),
        "| run | fp32 (strategy=auto precision=32) tokens/s | strategy=cpu_bf16 (bf16-mixed) tokens/s | ratio |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["ddp_scaling", "zero_memory", "cpu_bf16", "all"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,zero1,zero2,zero3")
    ap.add_argument("--extra", action="append", default=[], help="more llmlab.run overrides (zero_memory)")
    ap.add_argument("--ds-extra", action="append", default=[],
                    help="overrides for the DeepSpeed strategies only (zero_memory), e.g. strategy.reduce_bucket_size=...; "
                         "given: one table with them; absent: shipped config and SMALL_BUFFERS")
    ap.add_argument("--append", action="store_true", help=f"append the results to {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    command = "python bench/strategies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    if args.which in ("ddp_scaling", "all"):
        t0, load = time.time(), _load()
        table = ddp_scaling(args.steps or 30, args.repeats)
        sections.append(("DDP scaling on CPU: 1 process vs 2 processes", table, time.time() - t0, load,
                         "~23M-parameter GPT-2 (6 x 512), batch 8 x 256 tokens per process, fp32; tokens/s from "
                         "summary.json (all ranks' tokens, validation excluded)."))
    if args.which in ("zero_memory", "all"):
        t0, load = time.time(), _load()
        configs = {"given": args.ds_extra} if args.ds_extra else {"shipped": [], "small_buffers": SMALL_BUFFERS}
        tables, params = [], 0
        for label, ds_extra in configs.items():
            table, info = zero_memory(args.steps or 5, args.strategies.split(","), args.extra, ds_extra)
            params = info["params"]
            what = ("`conf/strategy/zero*.yaml` as shipped" if label == "shipped"
                    else f"DeepSpeed overrides `{' '.join(ds_extra)}`")
            tables.append(f"**{label}**: {what}\n\n{table}")
        extra = f" Extra overrides: `{' '.join(args.extra)}`." if args.extra else ""
        sections.append(("ZeRO 1/2/3 vs DDP: step time and per-process memory", "\n\n".join(tables),
                         time.time() - t0, load,
                         f"Model: {params / 1e6:.0f}M parameters (GPT-2 layout, 16 x 1024), fp32, AdamW; 2 CPU "
                         f"processes (gloo), one thread each, batch 2 x 128 tokens per process; {args.steps or 5} "
                         "steps; step time = median after the first, slowest rank. Memory: the larger rank's "
                         "resident set (RSS); peak = the highest VmHWM of the steps' phases (forward+backward, "
                         "then the optimizer step; in brackets: steps after the first), model building excluded; glibc malloc with a fixed 128 KiB mmap threshold so that RSS tracks live "
                         "memory (MALLOC_ENV). 'States / process' = weights + gradients + Adam states "
                         "(+ DeepSpeed's fp32 master partition for ZeRO-1/2) per process, bytes per parameter "
                         "16 / 14 / 12 / 8 for ddp / zero1 / zero2 / zero3 with 2 processes; measured RSS also "
                         "holds Python + libraries (~0.4 GB), activations, communication buffers and the "
                         "optimizer step's temporaries." + extra))
    if args.which in ("cpu_bf16", "all"):
        t0, load = time.time(), _load()
        table = cpu_bf16(args.steps or 30, args.repeats)
        sections.append(("cpu_bf16 vs fp32 (one process, same model)", table, time.time() - t0, load,
                         "~23M-parameter GPT-2 (6 x 512), batch 8 x 256 tokens, 2 threads; bf16 autocast on AMX."))
    text = [f"\n### {title}\n\n`{command}` ({seconds / 60:.1f} min; {_machine(load)}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n{note}\n\n{table}\n"
            for title, table, seconds, load, note in sections]
    print("".join(text))
    if args.append:
        with RESULTS.open("a") as f:
            f.write("".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
