"""The README's numbers, as a user gets them: each stage's default command (`python -m llmlab.run stage=<s>`)
over seeds and OpenMP thread counts, judged against the target the README and the stage's test state.

    python bench/readme_numbers.py --stages rm dpo --seeds 1234 0 2 3 4 --threads 1 [--out bench/readme_numbers.jsonl]
    python bench/readme_numbers.py --table          # the results so far as a markdown table
    python bench/readme_numbers.py --summary        # per stage, kind and threads: the README number's range
    python bench/readme_numbers.py --stages rm --overrides data.batch_size=32   # a candidate recipe, measured alike

One run at a time (the numbers are what is learned, not speed; wall and CPU seconds are recorded beside them
with the load). A run already in --out (same stage, seed and threads; its commit is recorded) is skipped, so an interrupted
sweep continues where it stopped. The stages start from the cached tiny bases as the README's commands do
(built on first use by the bases' own recipe). `OMP_WAIT_POLICY=PASSIVE` is set for runs with more than one
thread: it changes only how idle OpenMP threads wait (no spinning on a shared machine), not the order of any
float sum, so the numbers are those of a plain run with that many threads.

`--kind` runs the commands with the CPU kernels another kind of machine dispatches to, on this one (the README's
numbers must hold on each; only one kind is at hand). A float sum's order, so the numbers, follows from which
kernels run, and three libraries pick them from the CPU: ATen (`ATEN_CPU_CAPABILITY`, torch's own switch),
oneDNN (`ONEDNN_MAX_CPU_ISA`, its own) and MKL, which takes its Intel code paths only on an Intel CPU (a vendor
check, `mkl_serv_intel_cpu_true`, answered "yes" by a one-line library preloaded here, the workaround known for
MKL on AMD, or "no" for an AMD kind on an Intel host; `MKL_ENABLE_INSTRUCTIONS` caps the ISA).
Kinds (`--kind native` is this machine as it is):
    amd-avx2       AMD without AVX-512: ATen AVX2, oneDNN AVX2, MKL's non-Intel path (AVX2 already on AMD)
    intel-avx512   Intel with AVX-512 (AVX512-BF16; for fp32 runs also AMX's, which only bf16/int8 use):
                   ATen AVX512, oneDNN AVX512, MKL's Intel AVX-512 path
    intel-avx2     Intel without AVX-512: ATen AVX2, oneDNN AVX2, MKL's Intel AVX2 path
Not emulated: kernels chosen by CPU model or cache size (MKL's and oneDNN's blocking), and AMX itself. Each kind
builds its own tiny bases (`$LLMLAB_CACHE` = /tmp/llmlab-cache-<kind>) with the same kernels, as a user's machine
would.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# kind -> (its libraries' dispatch variables, MKL's vendor check answered Intel (1), not Intel (0) or left alone)
KINDS: dict[str, tuple[dict[str, str], int | None]] = {
    "native": ({}, None),
    "amd-avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 0),
    "intel-avx512": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, 1),
    "intel-avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1),
}


def mkl_vendor_shim(intel: int) -> str:
    """A library answering MKL's vendor check (`mkl_serv_intel_cpu_true`, exported by torch's libtorch_cpu.so and
    called through the PLT, so a preloaded one wins) with Intel (1) or not (0); built once with the C compiler."""
    lib = Path(tempfile.gettempdir()) / "llmlab-mkl-vendor" / f"libmkl_intel_cpu_{intel}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(f"int mkl_serv_intel_cpu_true(void) {{ return {intel}; }}\n")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return str(lib)


def kind_env(kind: str) -> dict[str, str]:
    """The environment variables that make this machine's libraries dispatch as on `kind` (see the docstring)."""
    variables, mkl_intel = KINDS[kind]
    env = dict(variables)
    if mkl_intel is not None:
        env["LD_PRELOAD"] = mkl_vendor_shim(mkl_intel)
    if kind != "native":
        env["LLMLAB_CACHE"] = str(Path(tempfile.gettempdir()) / f"llmlab-cache-{kind}")
    return env


# stage -> (what the README states, a judge of one run's summary.json). The judges are the tests' asserts
# (tests/test_<stage>.py test_default_*), so a seed that fails here would fail the suite's test too.
TARGETS = {
    "pretrain": ("val ppl at most half of its start (README: 269 -> 2.4)",
                 lambda s: s["val_ppl_last"] <= 0.5 * s["val_ppl_first"]),
    "sft": ("held-out EM > 0.8 (README: 0.0 -> 0.995-1.0)", lambda s: s["val_exact_match_last"] > 0.8),
    "rm": ("held-out pairwise accuracy >= 0.8", lambda s: s["val_accuracy"] >= 0.8),
    "dpo": ("reward accuracy >= 0.8 and EM not below the start - 0.01",
            lambda s: s["val_reward_accuracy"] >= 0.8
            and s["val_exact_match_last"] >= s["val_exact_match_first"] - 0.01),
    "orpo": ("EM not below the start - 0.01", lambda s: s["val_exact_match_last"] >= s["val_exact_match_first"] - 0.01),
    "simpo": ("EM not below the start - 0.01",
              lambda s: s["val_exact_match_last"] >= s["val_exact_match_first"] - 0.01),
    "kto": ("reward accuracy >= 0.5 (README: 0.0 -> 0.58)", lambda s: s["val_reward_accuracy"] >= 0.5),
    "ppo": ("reward of the last tenth > the first tenth, KL < 1",
            lambda s: s["reward_mean_last"] > s["reward_mean_first"] and s["kl_last"] < 1.0),
    "grpo": ("reward +0.15 and greedy EM +0.10",
             lambda s: round(s["reward_mean_last"] - s["reward_mean_first"], 6) >= 0.15
             and round(s["val_exact_match_last"] - s["val_exact_match_first"], 6) >= 0.10),  # as tests/test_grpo.py
}
# stage -> (name, value) of the number its README row quotes, read from a row of --out (for --summary)
HEADLINE = {
    "pretrain": ("val ppl", lambda r: r["val_ppl_last"]),
    "sft": ("held-out EM", lambda r: r["val_exact_match_last"]),
    "rm": ("pairwise accuracy", lambda r: r["val_accuracy"]),
    "dpo": ("reward accuracy", lambda r: r["val_reward_accuracy"]),
    "orpo": ("EM", lambda r: r["val_exact_match_last"]),
    "simpo": ("EM", lambda r: r["val_exact_match_last"]),
    "kto": ("reward accuracy", lambda r: r["val_reward_accuracy"]),
    "ppo": ("reward rise", lambda r: r["reward_mean_last"] - r["reward_mean_first"]),
    "grpo": ("greedy EM rise", lambda r: r["val_exact_match_last"] - r["val_exact_match_first"]),
}
# recipes changed after rows were recorded: stage -> (the commit that changed its default, the candidate's overrides
# whose rows were that default measured before it was adopted). --summary counts a default row only from that
# commit on, and the candidate's rows as the default.
RECIPES = {
    "sft": ("621dd31", ()),
    "rm": ("545b5f4", ("stage.module.scheduler.min_lr_ratio=0.3",)),
    "grpo": ("687fc7b", ("stage.module.scheduler.name=cosine",)),
}
KEYS = ("val_ppl", "val_exact_match", "val_accuracy", "val_reward", "reward_mean", "kl")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False,
                          text=True).stdout.strip()


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


@functools.cache
def is_ancestor(ancestor: str, commit: str) -> bool:
    """git's answer once per pair (a summary asks it for every row of the same few commits)."""
    return subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit], cwd=ROOT, capture_output=True,
                          check=False).returncode == 0


def done(out: Path) -> set[tuple]:
    rows = read_rows(out)
    return {(r["stage"], r["seed"], r["threads"], tuple(r.get("overrides", ())), r.get("kind", "native"))
            for r in rows if r.get("status") == "finished"}


def run_one(stage: str, seed: int, threads: int, run_root: Path, overrides: tuple = (), kind: str = "native") -> dict:
    name = "-".join([stage, f"seed{seed}", f"t{threads}", *overrides] + ([kind] if kind != "native" else []))
    run_dir = run_root / re.sub(r"[^A-Za-z0-9._-]", "_", name)
    env = {**os.environ, **kind_env(kind), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads > 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, "-m", "llmlab.run", f"stage={stage}", f"seed={seed}", *overrides,
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    before, load, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"stage": stage, "seed": seed, "threads": threads, "commit": commit(), "rc": proc.returncode,
           "wall_s": round(time.time() - t0, 1), "cpu_s": round(after.ru_utime + after.ru_stime
                                                                 - before.ru_utime - before.ru_stime, 1),
           "load_start": round(load, 1), "load_end": round(os.getloadavg()[0], 1),
           "command": " ".join([f"OMP_NUM_THREADS={threads} python -m llmlab.run stage={stage} seed={seed}",
                                *overrides])}
    if overrides:  # a candidate recipe: the default command with these on top
        row["overrides"] = list(overrides)
    if kind != "native":  # another machine kind's kernels (KINDS)
        row["kind"] = kind
    summary = run_dir / "summary.json"
    if proc.returncode or not summary.exists():
        row.update(status="failed", stderr_tail=proc.stderr[-600:])
        return row
    s = json.loads(summary.read_text())
    row.update({k: round(v, 4) for k, v in s.items() if k.startswith(KEYS) and isinstance(v, (int, float))})
    row["status"] = s.get("status")
    row["meets_target"] = bool(TARGETS[stage][1](s))
    return row


def table(out: Path) -> str:
    """The results file as a markdown table, one row per run (the README's rows are ranges over these)."""
    rows = read_rows(out)
    lines = ["| stage | seed | threads | numbers (first -> last) | meets the test's target | CPU s | wall s (load) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        firsts = sorted(k[: -len("_first")] for k in r if k.endswith("_first"))
        nums = ", ".join(f"{k} {r[k + '_first']} -> {r.get(k + '_last')}" for k in firsts)
        nums += "".join(f", {k} {r[k]}" for k in r if k.startswith(KEYS) and not k.endswith("_first")
                        and not (k.endswith("_last") and k[: -len("_last")] in firsts))
        try:  # judged again with today's TARGETS (the row keeps every number a judge reads)
            meets = bool(TARGETS[r["stage"]][1](r))
        except (KeyError, TypeError):
            meets = r.get("meets_target", r["status"])
        stage = " ".join([r["stage"], *r.get("overrides", ())] + ([f"({r['kind']})"] if "kind" in r else []))
        lines.append(f"| {stage} | {r['seed']} | {r['threads']} | {nums or r.get('stderr_tail', '')[-120:]} | "
                     f"{meets} | {r['cpu_s']} | {r['wall_s']} ({r['load_start']}) |")
    return "\n".join(lines)


def summary(out: Path) -> str:
    """One line per stage, kind and thread count of today's default recipe (RECIPES): the README's number over the
    seeds run (min-max) and how many runs meet the test's target."""
    rows = read_rows(out)
    groups: dict[tuple, list] = {}
    for r in rows:
        since, adopted = RECIPES.get(r["stage"], (None, ()))
        if r.get("overrides"):
            today = tuple(r["overrides"]) == adopted
        else:  # the default as it was at the row's commit
            today = since is None or is_ancestor(since, r["commit"])
        if r.get("status") == "finished" and today:
            groups.setdefault((r["stage"], r.get("kind", "native"), r["threads"]), []).append(r)
    lines = ["| stage | kernels (--kind) | threads | seeds | number: min-max | meet the test's target |",
             "|---|---|---|---|---|---|"]
    for (stage, kind, threads), runs in sorted(groups.items(), key=lambda kv: (list(TARGETS).index(kv[0][0]),
                                                                               kv[0][1] != "native", kv[0][1:])):
        name, value = HEADLINE[stage]
        values = [value(r) for r in runs]
        meets = sum(bool(TARGETS[stage][1](r)) for r in runs)
        lines.append(f"| {stage} | {kind} | {threads} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{name} {min(values):.3f}-{max(values):.3f} | {meets}/{len(runs)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1234, 0, 2, 3, 4])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "readme_numbers.jsonl")
    p.add_argument("--run-root", type=Path, default=Path("/tmp/llmlab-readme-numbers"))
    p.add_argument("--overrides", nargs="*", default=[],
                   help="a candidate recipe: overrides added to each default command (recorded in its row)")
    p.add_argument("--kind", default="native", choices=list(KINDS),
                   help="run with the CPU kernels another kind of machine dispatches to (see the docstring)")
    p.add_argument("--table", action="store_true", help="print --out as a markdown table and stop")
    p.add_argument("--summary", action="store_true",
                   help="print each default recipe's README number over seeds per kind and thread count, and stop")
    args = p.parse_args()
    if args.table or args.summary:
        print(table(args.out) if args.table else summary(args.out))
        return 0
    for threads in args.threads:
        for stage in args.stages:
            for seed in args.seeds:
                if (stage, seed, threads, tuple(args.overrides), args.kind) in done(args.out):
                    continue
                row = run_one(stage, seed, threads, args.run_root, tuple(args.overrides), args.kind)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
