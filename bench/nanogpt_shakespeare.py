"""A peer's table, reproduced (issue 22 point 7): nanoGPT's CPU shakespeare_char recipe vs llmlab's.

nanoGPT's README trains a character-level model on tinyshakespeare on a CPU ("I only have a macbook"): 4 layers
x 128 wide, 4 heads, block 64, batch 12, 2,000 iterations, lr 1e-3 -> 1e-4 (cosine, 100 warmup), beta2 0.99,
dropout 0, fp32, no compile, the first 90% of the text for training, the last 10% for validation. llmlab's
recipe is `conf/experiment/nanogpt_shakespeare_char.yaml`.

nanoGPT is not a dependency of llmlab: this script takes a path to a checkout of it (`--nanogpt PATH`,
e.g. `git clone https://github.com/karpathy/nanoGPT`) and runs its `train.py` unchanged, in a child process,
from that directory. If `PATH/data/shakespeare_char/train.bin` is missing, the text (`--text`, default
../shared/data/tinyshakespeare.txt) is copied to its `input.txt` and nanoGPT's own `prepare.py` is run
(it then writes train.bin/val.bin/meta.pkl into that checkout and downloads nothing). llmlab reads the same text
file as one document (`data.sample_by=document`) and validates on its last 10% of tokens (`data.holdout=tail`:
nanoGPT's prepare.py cuts one character earlier, llmlab's end-of-document EOS counting in the 10%).

Timing, the same on both sides: a step is the time between consecutive step ends (wall: perf_counter; CPU:
this process's user+sys, so a step that waited for a core shows less CPU than wall); the first step and the
steps that contain an evaluation (nanoGPT: the iterations at which it evaluates and saves; llmlab: the
validation runs, subtracted) are left out. nanoGPT's are taken from its own `iter N:` lines (`print` is
wrapped in the child process; train.py itself is unchanged). tokens/s = tokens of the timed steps / their
summed wall time (12 x 64 = 768 tokens a step on both sides); the median step is reported too. The two sides
alternate (nanoGPT, llmlab, nanoGPT, ...), so load on this shared machine hits both; each ratio is taken
within one repeat (llmlab / the nanoGPT run just before it).

Validation loss: nanoGPT's own estimate at step 2,000 (mean of `eval_iters` random batches of the validation
text, 200 here as the issue measured); llmlab's is exact (every 64-token block of the validation text once).

    PYTHONPATH=. python bench/nanogpt_shakespeare.py --nanogpt /path/to/nanoGPT [--repeats 2] [--threads 1]
        [--steps 2000] [--llmlab-extra "k=v k=v"] [--nanogpt-extra "--n_layer=1"] [--variant LABEL="k=v ..."]
        [--baseline OTHER_CHECKOUT] [--profile 100,240] [--components 200] [--append bench/out/nanogpt_shakespeare.md]

--threads N sets OMP_NUM_THREADS for both (default: torch's, one per core; on a loaded 2-core machine two
threads spin-wait, see bench/RESULTS.md). --variant adds another llmlab run to each repeat (the recipe plus
those overrides); --baseline another llmlab checkout run the same way (before/after a change).

--components REPS: the parts of one step (forward+loss, backward, clipping, AdamW) on both models in this
process, interleaved, without either framework: what the models cost apart from the loops around them.
--profile FROM,TO: one more pair of shorter runs under cProfile (steps FROM to TO of each), printing where each side's
Python time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TOKENS_PER_STEP = 12 * 64

NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=200",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters={steps}", "--lr_decay_iters={steps}", "--dropout=0.0"]
LLMLAB_ARGS = ["experiment=nanogpt_shakespeare_char", "data.train_files=[{text}]", "trainer.max_steps={steps}"]

# Runs nanoGPT's train.py unchanged in this child process; `print` is wrapped to time each printed line
# (wall, CPU) and optionally to run cProfile between two iterations.
WRAPPER = r"""
import builtins, json, runpy, sys, time
out, prof_from, prof_to = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
events, state = [], {"prof": None}
_print = builtins.print
def timed_print(*a, **k):
    now = (time.perf_counter(), time.process_time())
    s = " ".join(str(x) for x in a)
    events.append([s, *now])
    if s.startswith("iter "):
        it = int(s.split()[1].rstrip(":"))
        if it == prof_from:
            import cProfile
            state["prof"] = cProfile.Profile()
            state["prof"].enable()
        elif it == prof_to and state["prof"] is not None:
            state["prof"].disable()
            state["prof"].dump_stats(out + ".prof")
    _print(*a, **k)
builtins.print = timed_print
sys.argv = ["train.py", *sys.argv[4:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump(events, f)
"""


def prepare(nanogpt: Path, text: Path, work: Path) -> tuple[Path, Path]:
    """nanoGPT's train.bin/val.bin (its prepare.py, no download); llmlab reads the text itself (returned twice:
    the train and validation splits are the same file, cut by data.holdout=tail)."""
    data = nanogpt / "data" / "shakespeare_char"
    if not (data / "train.bin").exists():
        if not (data / "input.txt").exists():
            shutil.copyfile(text, data / "input.txt")  # prepare.py downloads only when input.txt is absent
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True)
    work.mkdir(parents=True, exist_ok=True)
    return text.resolve(), text.resolve()


def env(threads: int | None, root: Path = ROOT) -> dict:
    path = os.pathsep.join([str(root), str(ROOT / "bench")])  # llmlab from `root`; this bench's cputime.py
    e = {**os.environ, "PYTHONPATH": path}
    if threads:
        e.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return e


def step_stats(wall: list[float], cpu: list[float]) -> dict:
    return {"tokens_per_sec": TOKENS_PER_STEP * len(wall) / sum(wall),
            "median_step_ms": 1e3 * statistics.median(wall), "mean_step_ms": 1e3 * statistics.mean(wall),
            "cpu_ms_per_step": 1e3 * statistics.mean(cpu), "timed_steps": len(wall)}


def nanogpt_command(steps: int, extra: list[str] = ()) -> list[str]:
    return ["python", "train.py", *(a.format(steps=steps) for a in NANOGPT_ARGS), *extra]


def run_nanogpt(nanogpt: Path, steps: int, threads: int | None, work: Path, profile=(-1, -1),
                extra: list[str] = ()) -> dict:
    out = work / f"nanogpt_events_{time.time_ns()}.json"
    args = [a.format(steps=steps) for a in NANOGPT_ARGS] + [f"--out_dir={work / 'nanogpt_out'}", *extra]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(out), str(profile[0]), str(profile[1]), *args],
                          cwd=nanogpt, env=env(threads), capture_output=True, text=True)
    total = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"nanoGPT failed:\n{proc.stderr[-3000:]}")
    events = json.loads(out.read_text())
    wall, cpu, prev = [], [], None
    val_loss = None
    for s, w, c in events:
        if s.startswith("iter "):
            if prev is not None and int(s.split()[1].rstrip(":")) > 1:  # iteration 0 (and its warm-up) untimed
                wall.append(w - prev[0])
                cpu.append(c - prev[1])
            prev = (w, c)
        else:  # an evaluation (and checkpoint save) happened inside the next iteration's time: skip it
            prev = None
            if s.startswith("step ") and "val loss" in s:
                val_loss = float(s.rsplit("val loss", 1)[1])
    return {"val_loss": val_loss, "process_wall_s": total, **step_stats(wall, cpu),
            "profile": str(out) + ".prof" if profile[0] >= 0 else None}


def llmlab_command(steps: int, train: Path, val: Path, extra: list[str]) -> list[str]:
    return ["python", "-m", "llmlab.run", *(a.format(steps=steps, text=train) for a in LLMLAB_ARGS),
            *extra]


def run_llmlab(steps: int, train: Path, val: Path, extra: list[str], threads: int | None, work: Path,
               profile=(-1, -1), root: Path = ROOT) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="llmlab_"))
    times = run_dir / "steptimes.json"
    cmd = [sys.executable, *llmlab_command(steps, train, val, extra)[1:], f"hydra.run.dir={run_dir}",
           "+callbacks.steptimes._target_=cputime.StepTimes", f"+callbacks.steptimes.path={times}"]
    if profile[0] >= 0:
        cmd += [f"+callbacks.steptimes.profile_from={profile[0]}", f"+callbacks.steptimes.profile_to={profile[1]}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env(threads, root), capture_output=True, text=True)
    total = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"llmlab failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    t = json.loads(times.read_text())
    out = {"val_loss": summary["val_loss_last"], "process_wall_s": total, **step_stats(t["wall"], t["cpu"]),
           "summary_tokens_per_sec": summary["tokens_per_sec"],
           "profile": str(times) + ".prof" if profile[0] >= 0 else None}
    if profile[0] < 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def ratio(res: dict, ng: dict, key: str) -> float:
    """res's speed relative to nanoGPT's (> 1: faster): tokens/s up, milliseconds down."""
    return res[key] / ng[key] if key == "tokens_per_sec" else ng[key] / res[key]


def ratios(res: dict, ng: dict | None) -> str:
    if ng is None or res is ng:
        return "| | |"
    return " | ".join(f"{ratio(res, ng, k):.3f}x" for k in ("tokens_per_sec", "median_step_ms", "cpu_ms_per_step")) + " |"


def report(r: int, name: str, res: dict, ng: dict | None) -> None:
    print(f"repeat {r} {name:16s} val {res['val_loss']:.4f}  {res['tokens_per_sec']:7,.0f} tok/s  "
          f"median step {res['median_step_ms']:.1f} ms  CPU {res['cpu_ms_per_step']:.1f} ms/step  "
          f"run {res['process_wall_s']:.0f} s  {'vs nanoGPT ' + ratios(res, ng) if ng else ''} "
          f"(load {os.getloadavg()[0]:.2f})", flush=True)


def components(nanogpt: Path, threads: int | None, reps: int) -> str:
    """One process, interleaved: the parts of a step on llmlab's model (the recipe's HF GPT-2) and on nanoGPT's
    GPT (imported from the checkout), without either framework around them: forward + loss, backward,
    clipping (+ llmlab's non-finite check on llmlab's side), AdamW step + zero_grad (for-loop as both use on
    CPU, and fused). CPU milliseconds, median over `reps` steps after 10 warm-up steps."""
    # lazy: --components only; the default mode runs both trainers in child processes and needs none of these
    import torch
    from hydra import compose, initialize_config_dir

    from llmlab.losses import causal_lm_loss_sum
    from llmlab.models.build import build_model, build_tokenizer
    from llmlab.optim import grads_finite, param_groups

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # lazy: nanoGPT's model.py, from the --nanogpt checkout put on sys.path above

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=nanogpt_shakespeare_char", "data.train_files=[x.txt]"])
    torch.manual_seed(0)
    models = {"llmlab (HF GPT-2, vocab 259)": build_model(cfg.model, build_tokenizer(cfg.model)),
              "nanoGPT (GPT, vocab 65)": GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4,
                                                       n_embd=128, dropout=0.0, bias=False))}
    x = torch.randint(0, 65, (12, 65))
    xi, yi = x[:, :64].contiguous(), x[:, 1:].contiguous()

    def loss_of(name, model):
        if name.startswith("llmlab"):
            loss_sum, n = causal_lm_loss_sum(model(input_ids=xi, use_cache=False).logits, xi)
            return loss_sum / n
        return model(xi, yi)[1]

    def step(name, model, opt):
        t = [time.process_time()]
        loss = loss_of(name, model)
        t.append(time.process_time())
        loss.backward()
        t.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if name.startswith("llmlab"):
            grads_finite(opt)
        t.append(time.process_time())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.process_time())
        return [b - a for a, b in zip(t, t[1:])]

    runs = {(name, kind): torch.optim.AdamW(param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.99),
                                            **({"fused": True} if kind == "fused" else {"foreach": False}))
            for name, m in models.items() for kind in ("for-loop", "fused")}
    times = {k: [] for k in runs}
    for _ in range(reps + 10):
        for (name, kind), opt in runs.items():
            times[(name, kind)].append(step(name, models[name], opt))
    lines = [f"\nstep parts without a framework, one process, interleaved, {threads or torch.get_num_threads()} "
             f"thread(s), CPU ms (median of {reps}); load {os.getloadavg()}", "",
             "| model | params (tensors) | AdamW | forward+loss | backward | clip (+ guard) | AdamW step + zero_grad | "
             "total |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (name, kind), ts in times.items():
        med = [1e3 * statistics.median(t[i] for t in ts[10:]) for i in range(4)]
        ps = list(models[name].parameters())
        lines.append(f"| {name} | {sum(p.numel() for p in ps):,} ({len(ps)}) | {kind} | "
                     + " | ".join(f"{m:.2f}" for m in med) + f" | {sum(med):.2f} |")
    return "\n".join(lines)


def print_profile(name: str, path: str, steps: int, top: int = 25) -> None:
    st = pstats.Stats(path)
    total = st.total_tt
    print(f"\n### {name}: cProfile over {steps} steps: {1e3 * total / steps:.1f} ms/step of profiled time")
    print("| function | tottime ms/step | cumtime ms/step |\n|---|---:|---:|")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][3])  # by cumulative time
    for (file, line, fn), (cc, nc, tt, ct, _) in rows[:top]:
        print(f"| {Path(file).name}:{line} {fn} (x{nc / steps:.0f}) | {1e3 * tt / steps:.2f} | "
              f"{1e3 * ct / steps:.2f} |")
    print("\nby self time:")
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        print(f"  {1e3 * tt / steps:6.2f} ms/step  x{nc / steps:5.0f}  {Path(file).name}:{line} {fn}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, required=True,
                    help="a checkout of https://github.com/karpathy/nanoGPT (not a dependency of llmlab)")
    ap.add_argument("--text", type=Path, default=TEXT, help="tinyshakespeare as one text file")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "nanogpt_shakespeare")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS (default: torch's, one per core)")
    ap.add_argument("--llmlab-extra", default="", help="more llmlab overrides, one string")
    ap.add_argument("--nanogpt-extra", default="", help="more nanoGPT arguments, one string (e.g. --n_layer=1)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=OVERRIDES",
                    help="another llmlab run in each repeat, with these overrides on top (repeatable)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another llmlab checkout (e.g. `git archive` of an older commit) run in each repeat")
    ap.add_argument("--skip-nanogpt", action="store_true", help="llmlab only (no ratio)")
    ap.add_argument("--profile", default=None, metavar="FROM,TO",
                    help="then one shorter run of each (TO + 10 steps) under cProfile between steps FROM and TO")
    ap.add_argument("--components", type=int, default=0, metavar="REPS",
                    help="then time a step's parts on both models in this process (no framework), REPS steps each")
    ap.add_argument("--append", type=Path, default=None, help="append the table (markdown) to this file")
    args = ap.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").exists() or not (nanogpt / "config" / "train_shakespeare_char.py").exists():
        sys.exit(f"--nanogpt {nanogpt}: not a nanoGPT checkout (no train.py / config/train_shakespeare_char.py)")
    train, val = prepare(nanogpt, args.text, args.work)
    extra, ng_extra = shlex.split(args.llmlab_extra), shlex.split(args.nanogpt_extra)
    # llmlab variants: label -> (overrides, checkout); "llmlab" is this checkout with --llmlab-extra
    variants = {"llmlab": (extra, ROOT)}
    for item in filter(None, args.variant):
        label, _, overrides = item.partition("=")
        variants[label] = ([*extra, *shlex.split(overrides)], ROOT)
    if args.baseline:
        variants["llmlab@baseline"] = (extra, args.baseline.resolve())
    ng_cmd = " ".join(nanogpt_command(args.steps, ng_extra))
    head = (f"load {os.getloadavg()}; threads {args.threads or 'default'}; {os.cpu_count()} CPUs; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    rows = []  # per repeat: {name: result}
    for r in range(args.repeats):
        row = {}
        if not args.skip_nanogpt:
            row["nanoGPT"] = run_nanogpt(nanogpt, args.steps, args.threads, args.work, extra=ng_extra)
            report(r, "nanoGPT", row["nanoGPT"], None)
        for label, (overrides, root) in variants.items():
            row[label] = run_llmlab(args.steps, train, val, overrides, args.threads, args.work, root=root)
            report(r, label, row[label], row.get("nanoGPT"))
        rows.append(row)
    lines = [f"\n{head}; {args.steps} steps, {args.repeats} repeats (in each: "
             f"{', '.join(['nanoGPT'] * (not args.skip_nanogpt) + list(variants))})", "",
             f"    cd {nanogpt} && {ng_cmd}"]
    for label, (overrides, root) in variants.items():
        lines.append(f"    {label}: {'cd ' + str(root) + ' && ' if root != ROOT else ''}"
                     f"{' '.join(llmlab_command(args.steps, train, val, overrides))}")
    lines += ["", "| repeat | run | val loss | tokens/s | median step ms | CPU ms/step | whole run s | "
              "vs nanoGPT: tokens/s | by median step | by CPU/step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, row in enumerate(rows):
        ng = row.get("nanoGPT")
        for name, res in row.items():
            lines.append(f"| {r} | {name} | {res['val_loss']:.4f} | {res['tokens_per_sec']:,.0f} | "
                         f"{res['median_step_ms']:.1f} | {res['cpu_ms_per_step']:.1f} | "
                         f"{res['process_wall_s']:.0f} | {ratios(res, ng)}")
    if rows and not args.skip_nanogpt:
        lines.append("")
        for label in variants:
            for key, what in (("tokens_per_sec", "tokens/s"), ("median_step_ms", "median step"),
                              ("cpu_ms_per_step", "CPU/step")):
                xs = [ratio(row[label], row["nanoGPT"], key) for row in rows]
                lines.append(f"{label} / nanoGPT by {what}: median {statistics.median(xs):.3f}x "
                             f"(each repeat: {', '.join(f'{x:.3f}' for x in xs)})  ")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write(table + "\n")
    if args.components:
        text = components(nanogpt, args.threads, args.components)
        print(text)
        if args.append:
            with open(args.append, "a") as f:
                f.write(text + "\n")
    if args.profile:
        window = tuple(int(x) for x in args.profile.split(","))
        ng = None if args.skip_nanogpt else run_nanogpt(nanogpt, window[1] + 10, args.threads, args.work, window,
                                                              ng_extra)
        ll = run_llmlab(window[1] + 10, train, val, extra, args.threads, args.work, window)
        if ng:
            print_profile("nanoGPT", ng["profile"], window[1] - window[0])
        print_profile("llmlab", ll["profile"], window[1] - window[0])


if __name__ == "__main__":
    main()
