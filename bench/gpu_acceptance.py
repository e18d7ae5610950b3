"""The GPU acceptance run (issue 23 point 4): what no CPU can check, in one command, <= 8 minutes on one H100.

    bash bench/gpu_acceptance.sh [--out FILE] [--only CHECK,...] [--dry-run] [--keep DIR]

Each check runs in its own process (`--run-check NAME`) under its own timeout, so a hang costs that check only;
the results are markdown lines ready for bench/RESULTS.md, written to `--out` (default
bench/gpu_acceptance_results.md) after every check, so a run cut short keeps what it measured.

Checks (seconds allowed; all models are built from configs, random weights: nothing is downloaded):
- precisions (100): the tiny default run on the GPU at precision=default (must become bf16-mixed), 32,
  bf16-mixed, bf16-true, 16-mixed, each final validation loss within tolerance of the same run on the CPU at fp32;
- fsdp (100): strategy=fsdp trains, is killed (-9) after its first checkpoint, `resume=auto` finishes it, export;
- qlora (60): 4-bit weights on CUDA (bitsandbytes' CUDA kernels) + LoRA trained through `peft=qlora`;
- attention (90): packed rows equal each document alone with flash_attention_2 (if flash_attn is installed),
  flex_attention and sdpa on CUDA; packed training through llmlab with flex (and flash) attention; the mask
  memory / step time table of bench/attention_mask.py at T = 2,048 /
  4,096 / 8,192;
- mfu (70): GPT-2 124M tokens/s and MFU, llmlab vs a plain PyTorch loop on the same GPU (bf16 autocast);
- grpo (60): GRPO rollout samples/s on the tiny model.
torch, transformers and llmlab are imported inside the check functions (lazy: the driver, `--dry-run` and argument
errors answer without them; each check imports them in its own process). `--dry-run` runs nothing on a GPU: it checks the arguments, plans every check and writes the result file with
each check marked "not run" (the fast tier tests exactly this, tests/test_gpu_acceptance.py).
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# check -> (seconds it may take, what it checks); the sum is the 8-minute budget on one H100
CHECKS: dict[str, tuple[int, str]] = {
    "precisions": (100, "tiny run at default/32/bf16-mixed/bf16-true/16-mixed vs CPU fp32"),
    "fsdp": (100, "strategy=fsdp train -> kill -9 -> resume=auto -> export"),
    "qlora": (60, "peft=qlora with bitsandbytes' CUDA 4-bit kernels"),
    "attention": (90, "packed == unpacked logits and packed training (flash_attention_2, flex_attention, sdpa); "
                      "mask memory table"),
    "mfu": (70, "GPT-2 124M tokens/s and MFU: llmlab vs a plain PyTorch loop"),
    "grpo": (60, "GRPO rollout samples/s (tiny model)"),
}
BUDGET_S = 480
# a tiny run: the default job's model and data, a few steps, nothing written but summary.json
TINY = ["trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=4", "data.n_train=2000",
        "data.n_val=64", "trainer.enable_progress_bar=false", "callbacks.samples=null", "callbacks.hf_export=null",
        "callbacks.model_checkpoint=null"]
# final validation loss vs the CPU fp32 run: relative tolerance per precision (fp32 on the GPU uses TF32 matmuls:
# train.py sets float32_matmul_precision high)
TOLERANCE = {"default": 0.05, "32": 0.02, "bf16-mixed": 0.05, "bf16-true": 0.08, "16-mixed": 0.05}
# dense bf16 peak FLOP/s by device name (the MFU denominator); unknown devices report tokens/s only
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class UsageError(Exception):
    """A bad argument: one `llmlab: error:` line, exit 2."""


def env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def llmlab(*args: str, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmlab.run", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{what}: exit {proc.returncode}: {tail[:300]}")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


SINK: Path | None = None  # in a check's process: every row is appended here at once (a timeout keeps them)


def row(check: str, what: str, measured: str, expected: str, passed: bool | None) -> dict:
    r = {"check": check, "what": what, "measured": measured, "expected": expected,
         "result": {True: "ok", False: "FAILED", None: "info"}[passed]}
    if SINK is not None:
        with open(SINK, "a") as f:
            f.write(json.dumps(r) + "\n")
    return r


# ---------------------------------------------------------------------------------------------------- the checks
def check_precisions(tmp: Path) -> list[dict]:
    cpu = tmp / "cpu32"
    ok(llmlab(*TINY, "trainer.accelerator=cpu", "precision=32", f"hydra.run.dir={cpu}", timeout=60), "CPU fp32 run")
    ref = summary(cpu)["val_loss_last"]
    names = list(TOLERANCE)
    sweep = tmp / "gpu"
    ok(llmlab("-m", *TINY, "precision=" + ",".join(f"'{n}'" if n.isdigit() else n for n in names),
              f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", timeout=100), "GPU precision sweep")
    rows = []
    for i, name in enumerate(names):
        job = sweep / str(i)
        s = summary(job) if (job / "summary.json").exists() else {"status": "no summary.json"}
        loss, log = s.get("val_loss_last"), (job / "run.log").read_text() if (job / "run.log").exists() else ""
        if not isinstance(loss, (int, float)):  # a failed sweep job is recorded and the sweep goes on
            rows.append(row("precisions", f"precision={name}", f"{s.get('status')}: {s.get('error', '')[:200]}",
                            "a finished run", False))
            continue
        rel = abs(loss - ref) / ref
        on_gpu = "x GPU (" in log
        precision = s.get("precision")
        expected_precision = "bf16-mixed" if name == "default" else None
        passed = rel <= TOLERANCE[name] and on_gpu and (expected_precision in (None, precision))
        rows.append(row("precisions", f"precision={name} ({precision})", f"val_loss {loss:.4f} (CPU fp32 {ref:.4f}, "
                        f"{rel:.1%} apart){'' if on_gpu else '; NOT on the GPU'}", f"<= {TOLERANCE[name]:.0%}"
                        + (", precision bf16-mixed" if expected_precision else ""), passed))
    return rows


def check_fsdp(tmp: Path) -> list[dict]:
    run = tmp / "fsdp"
    # a checkpoint every 50 steps of 300: the kill lands after the first one, well before the end
    args = ["strategy=fsdp", "trainer.max_steps=300", "trainer.val_check_interval=50", "trainer.limit_val_batches=1",
            "data.n_train=4000", "data.n_val=16", "trainer.enable_progress_bar=false", "callbacks.samples=null",
            f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.run", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, ckpt = time.monotonic() + 40, run / "checkpoints" / "last.ckpt"
    while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.2)
    killed = proc.poll() is None and ckpt.exists()
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = [row("fsdp", "train, kill -9 after the first checkpoint", "killed mid-run with last.ckpt written" if killed
                else f"not killed mid-run (exit {proc.returncode}, last.ckpt {'present' if ckpt.exists() else 'absent'})",
                "a checkpoint, then the kill", killed)]
    if not ckpt.exists():
        return rows
    resumed = llmlab(*args, "resume=auto", timeout=45)
    s = summary(run) if (run / "summary.json").exists() else {}
    rows.append(row("fsdp", "resume=auto to the end", f"exit {resumed.returncode}, status {s.get('status')}",
                    "exit 0, finished", resumed.returncode == 0 and s.get("status") == "finished"))
    export = subprocess.run([sys.executable, "-m", "llmlab.export", str(run)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=30)
    merged = run / "export" / "merged"
    diff = weights_diff(merged, run / "hf") if export.returncode == 0 and (run / "hf").is_dir() else None
    rows.append(row("fsdp", "llmlab.export (from the sharded checkpoint) vs the run's own hf/",
                    f"exit {export.returncode}" + (f"; max |weight diff| {diff:.1e}" if diff is not None else ""),
                    "exit 0, same weights (<= 1e-6)", diff is not None and diff <= 1e-6))
    return rows


def weights_diff(a: Path, b: Path) -> float:
    """Largest |difference| between two saved models' parameters (same architecture)."""
    from transformers import AutoModelForCausalLM

    sa, sb = (AutoModelForCausalLM.from_pretrained(p).float().state_dict() for p in (a, b))
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def tiny_llama_dir(out: Path, vocab: int) -> Path:
    """A small Llama saved with save_pretrained (random weights): what `peft=qlora` loads 4-bit."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def check_qlora(tmp: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmlab.data.tokenizer import builtin_tokenizer

    base = tiny_llama_dir(tmp / "base", len(builtin_tokenizer()))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": 0})
    layer = model.model.layers[0].self_attn.q_proj
    kernels = f"{type(layer).__module__}.{type(layer).__name__} weight {layer.weight.dtype} on {layer.weight.device}"
    rows = [row("qlora", "4-bit layer placement", kernels, "bitsandbytes Linear4bit, uint8 on cuda",
                "Linear4bit" in type(layer).__name__ and layer.weight.device.type == "cuda")]
    del model
    run = tmp / "qlora"
    proc = llmlab("stage=sft", "model=hf", f"model.pretrained={base}", "model.tokenizer=builtin", "peft=qlora",
                  "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=4",
                  "data.n_train=600", "data.n_val=32", "trainer.enable_progress_bar=false", "callbacks.samples=null",
                  "callbacks.hf_export=null", "callbacks.model_checkpoint=null", f"hydra.run.dir={run}", timeout=45)
    ok(proc, "qlora run")
    s = summary(run)
    log = (run / "run.log").read_text()
    rows.append(row("qlora", "peft=qlora trains on the GPU", f"val_loss {s['val_loss_first']:.3f} -> "
                    f"{s['val_loss_last']:.3f}; {s.get('precision')}", "loss falls, on the GPU",
                    s["val_loss_last"] < s["val_loss_first"] and "x GPU (" in log))
    return rows


def packed_equals_alone(attn: str) -> float:
    """Largest |logit| difference between a document inside a packed 2,048-token row and the document alone."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmlab.data.packing import pack
    from llmlab.stages.common import forward_logits

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.bfloat16).cuda().eval()
    docs = [torch.randint(0, 500, (int(n),)).tolist() for n in torch.randint(30, 400, (12,))]
    a = torch.randint(0, 500, (200,)).tolist()
    before = sum(len(d) + 1 for d in docs)
    block = next(pack([*docs, a], block_size=before + len(a) + 1, eos_id=511))
    batch = {k: v[None].cuda() for k, v in block.items()}
    with torch.no_grad():
        packed = forward_logits(model, batch)[0, before:].float()
        alone = model(torch.tensor([a + [511]], device="cuda")).logits[0].float()
    return float((packed - alone).abs().max())


def check_attention(tmp: Path) -> list[dict]:
    rows = []
    impls = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    for attn in impls:
        diff = packed_equals_alone(attn)
        rows.append(row("attention", f"packed == alone, {attn} (bf16)", f"max |diff| {diff:.2e}", "<= 3e-2 (bf16)",
                        diff <= 3e-2))
    if "flash_attention_2" not in impls:
        rows.append(row("attention", "flash_attention_2", "flash_attn not installed", "-", None))
    for attn in impls[1:]:  # packed training through llmlab with the kernels' backward (flex has none on CPU)
        run = tmp / f"train_{attn}"
        proc = llmlab("model=tiny_llama", f"model.attn_implementation={attn}", "trainer.max_steps=30",
                      "trainer.val_check_interval=30", "trainer.limit_val_batches=2", "data.n_train=1000",
                      "data.n_val=32", "trainer.enable_progress_bar=false", "callbacks.samples=null",
                      "callbacks.hf_export=null", "callbacks.model_checkpoint=null", f"hydra.run.dir={run}", timeout=25)
        s = summary(run) if proc.returncode == 0 else {}
        first, last = s.get("val_loss_first"), s.get("val_loss_last")
        rows.append(row("attention", f"packed training, model.attn_implementation={attn}",
                        f"val_loss {first:.3f} -> {last:.3f}" if s else f"exit {proc.returncode}: "
                        f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", "loss falls",
                        bool(s) and last < first))
    table = tmp / "attention.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "attention_mask.py"), "--device", "cuda",
                           "--in-process", "--out", str(table), "--layers", "4", "--hidden", "512", "--heads", "8",
                           "--batch", "2", "--variants",
                           ",".join(["float", "bool", "flex_attention"] + impls[2:])],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=35)
    ok(proc, "bench/attention_mask.py --device cuda")
    for line in table.read_text().splitlines()[2:]:
        rows.append(row("attention", "mask memory / step (B x T, variant, docs, mask MiB, step s, peak MiB)",
                        line.strip("| ").replace(" | ", "; "), "-", None))
    return rows


def flops_per_token(n_params: int, layers: int, width: int, T: int) -> float:
    """Training FLOPs per token: 6 N (weights) + 12 L d T (attention scores and values), as nanoGPT's MFU."""
    return 6 * n_params + 12 * layers * width * T


def plain_gpt2_tokens_per_sec(steps: int = 25, batch: int = 8, T: int = 1024) -> tuple[float, int]:
    """A plain PyTorch loop on the same GPT-2 124M: bf16 autocast, fused AdamW, random tokens."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    model = AutoModelForCausalLM.from_config(GPT2Config(n_positions=T)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 50257, (batch, T), device="cuda")
    t0 = None
    for step in range(steps):
        if step == 5:  # warm-up steps are not timed (as llmlab's RunSummary leaves its first step out)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch * T * (steps - 5) / (time.perf_counter() - t0), sum(p.numel() for p in model.parameters())


def check_mfu(tmp: Path) -> list[dict]:
    import torch

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    run = tmp / "gpt2"
    proc = llmlab("model=gpt2", "model.init=scratch", "model.tokenizer=builtin", "data.block_size=1024",
                  "data.batch_size=8", "data.n_train=12000", "data.n_val=16", "trainer.max_steps=25",
                  "trainer.val_check_interval=25", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                  "trainer.enable_progress_bar=false", "callbacks.samples=null", "callbacks.hf_export=null",
                  "callbacks.model_checkpoint=null", f"hydra.run.dir={run}", timeout=45)
    ok(proc, "llmlab GPT-2 124M run")
    s = summary(run)
    plain, n = plain_gpt2_tokens_per_sec()
    per_token = flops_per_token(n, 12, 768, 1024)
    rows = []
    for who, tps in (("llmlab", s["tokens_per_sec"]), ("plain PyTorch loop", plain)):
        mfu = f", MFU {tps * per_token / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
        rows.append(row("mfu", f"GPT-2 124M, 8 x 1024, bf16-mixed, {who}", f"{tps:,.0f} tokens/s{mfu}", "-", None))
    rows.append(row("mfu", "llmlab / plain", f"{s['tokens_per_sec'] / plain:.2f}x", ">= 0.8x",
                    s["tokens_per_sec"] / plain >= 0.8))
    return rows


def check_grpo(tmp: Path) -> list[dict]:
    run = tmp / "grpo"
    proc = llmlab("stage=grpo", "model=tiny", "trainer.max_steps=24", "trainer.val_check_interval=24",
                  "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                  "callbacks.samples=null", "callbacks.hf_export=null", "callbacks.model_checkpoint=null",
                  f"hydra.run.dir={run}", timeout=55)
    ok(proc, "grpo run")
    rates = []
    for path in glob.glob(str(run / "**" / "metrics.csv"), recursive=True):
        with open(path) as f:
            rates += [float(r["train/samples_per_sec"]) for r in csv.DictReader(f) if r.get("train/samples_per_sec")]
    measured = f"{sum(rates) / len(rates):.1f} samples/s over {len(rates)} rollouts" if rates else "no rollout logged"
    return [row("grpo", "rollout samples/s, tiny model", measured, "> 0", bool(rates))]


RUNNERS = {"precisions": check_precisions, "fsdp": check_fsdp, "qlora": check_qlora, "attention": check_attention,
           "mfu": check_mfu, "grpo": check_grpo}


# ---------------------------------------------------------------------------------------------------- the driver
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_acceptance.sh", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_acceptance_results.md"),
                   help="markdown file the result lines are written to (replaced)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma list of checks: {', '.join(CHECKS)}")
    p.add_argument("--dry-run", action="store_true", help="check arguments and write the plan; run nothing")
    p.add_argument("--keep", default=None, help="keep the checks' run dirs under this directory")
    p.add_argument("--run-check", default=None, help=argparse.SUPPRESS)  # internal: one check, JSON rows on stdout
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)

    def error(message: str):
        raise UsageError(message)

    p.error = error  # one line and exit 2 (main), not argparse's usage block
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise UsageError(f"--only={args.only}: unknown check {', '.join(unknown) or '(none named)'}; use any of "
                         f"{', '.join(CHECKS)}")
    args.checks = names
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out={args.out}: give a file in an existing directory")
    return args


def header(device: str, dry: bool) -> list[str]:
    import platform

    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for name in ("torch", "transformers", "lightning"):  # from the installed metadata: no import (dry runs stay fast)
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} absent")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"## gpu_acceptance: DRY RUN on {socket.gethostname()}: nothing ran on a GPU ({when})" if dry
             else f"## gpu_acceptance on {device} ({when})")
    return [title, "", f"    bash bench/gpu_acceptance.sh --out {{file}}   # {', '.join(versions)}, "
            f"Python {platform.python_version()}", "", "| check | what | measured | expected | result |",
            "|---|---|---|---|---|"]


def write(out: Path, lines: list[str], rows: list[dict]) -> None:
    """The whole file, rewritten after every check (a run cut short keeps what it measured)."""
    body = [f"| {r['check']} | {r['what']} | {r['measured']} | {r['expected']} | {r['result']} |" for r in rows]
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("\n".join([*(ln.replace("{file}", out.name) for ln in lines), *body]) + "\n")
    tmp.replace(out)


def run_check(name: str, tmp: Path) -> list[dict]:
    """One check in its own process (its own process group), killed at its time limit; the rows it wrote before
    a timeout or an error are kept."""
    limit = CHECKS[name][0]
    (tmp / name).mkdir(parents=True, exist_ok=True)
    sink = tmp / name / "rows.jsonl"
    sink.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--run-check", name, "--tmp", str(tmp / name)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a timeout kills the check's llmlab runs too
    try:
        _, err = proc.communicate(timeout=limit)
        outcome = None if proc.returncode == 0 else f"error: {(err.strip().splitlines() or ['?'])[-1][:300]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        outcome = f"timed out after {limit} s"
    rows = [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
    if outcome:
        rows.append(row(name, CHECKS[name][1], outcome, f"<= {limit} s" if "timed out" in outcome else "-", False))
    rows.append(row(name, "time", f"{time.perf_counter() - t0:.0f} s", f"<= {limit} s", None))
    return rows


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 2
    if args.run_check:  # a check's own process: rows go to <tmp>/rows.jsonl as they are made
        global SINK
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        SINK = Path(args.tmp) / "rows.jsonl"
        RUNNERS[args.run_check](Path(args.tmp))
        return 0
    out = Path(args.out)
    if args.dry_run:  # nothing imported that a GPU would need: torch is not asked
        lines = header("", dry=True)
        rows = [row(n, CHECKS[n][1], "not run (dry run)", f"<= {CHECKS[n][0]} s", None) for n in args.checks]
        write(out, lines, rows)
        total = sum(CHECKS[n][0] for n in args.checks)
        print(f"dry run: {len(rows)} checks planned, {total} s at most (budget {BUDGET_S} s); wrote {out}")
        return 0
    import torch  # lazy: --dry-run and argument errors answer without it

    if not torch.cuda.is_available():
        print("llmlab: error: no CUDA GPU is visible here: run this on a GPU machine, or add --dry-run to check the "
              "arguments and the result file", file=sys.stderr)
        return 2
    lines = header(torch.cuda.get_device_name(0), dry=False)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        for name in args.checks:
            print(f"{name} ({CHECKS[name][0]} s at most): {CHECKS[name][1]}", flush=True)
            rows += run_check(name, tmp)
            write(out, lines, rows)
            for r in rows:
                if r["check"] == name:
                    print(f"  {r['what']}: {r['measured']} [{r['result']}]", flush=True)
    failed = [r for r in rows if r["result"] == "FAILED"]
    print(f"{len(rows)} lines, {len(failed)} failed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
