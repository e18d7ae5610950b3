"""The support matrix: every stage x peft {none, lora, qlora} x strategy {auto, ddp, zero2, zero3}, each
run through the real `python -m llmlab.run` for 2 optimizer steps (2 CPU processes; `auto` is one), or
refused up front by llmlab's checks (exit 2, one line naming the fix). Writes docs/support-matrix.md.

    python -m tests.support_matrix                  # everything -> docs/support-matrix.md (~15-25 min here)
    python -m tests.support_matrix --jobs 2         # two runs at a time (default)
    python -m tests.support_matrix --only stage=sft --only strategy=zero3 --no-write

Stages are the `conf/stage/*.yaml` files present when it runs, so a new stage joins the matrix by
existing. Each cell uses its stage's default model (sft: the cached pretrained tiny base; rm, dpo,
ppo: the cached SFT'd one), shrunk data and steps, and keeps validation (generation included), sample
generation, checkpointing and the `hf/` export on, so every ZeRO-3 path a real run takes is exercised.
`tests/test_support_matrix.py` runs a representative subset in CI and checks the document against it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "support-matrix.md"
PEFTS = ("none", "lora", "qlora")
STRATEGIES = ("auto", "ddp", "zero2", "zero3")
STAGE_ORDER = ("pretrain", "sft", "rm", "dpo", "ppo")
STEPS = 2
RUN_TIMEOUT_S = 420  # a ZeRO-3 hang fails the cell instead of blocking

# Every cell: 2 optimizer steps on little data, validation at step 2 (generation included), samples,
# checkpoint and hf/ export as in a real run.
BASE = [
    f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "data.n_train=64", "data.n_val=8", "data.batch_size=4", "data.val_batch_size=4",
    "callbacks.samples.max_new_tokens=8",
]
# per stage: what keeps 2 steps cheap (ppo: one rollout of 4 prompts = 2 mini-batch updates)
STAGE_OVERRIDES = {
    "ppo": ["stage.module.mini_batch_size=4", "stage.module.ppo_epochs=2", "stage.module.response_length=[4,6]",
            "stage.module.samples_per_prompt=1", "stage.module.group_baseline=false"],
}
# QLoRA quantizes pretrained weights as they load: stage=pretrain continues the pretrained tiny base
QLORA_MODEL = {"pretrain": ["model=tiny_base"]}


@dataclasses.dataclass(frozen=True)
class Cell:
    stage: str
    peft: str
    strategy: str
    precision: str | None = None  # None: the default (32)
    devices: int | None = None  # None: 1 for auto/cpu_bf16, else 2
    extra: tuple[str, ...] = ()
    note: str = ""

    @property
    def key(self) -> str:
        parts = [f"stage={self.stage}", f"peft={self.peft}", f"strategy={self.strategy}"]
        if self.precision:
            parts.append(f"precision={self.precision}")
        if self.devices is not None:
            parts.append(f"trainer.devices={self.devices}")
        return " ".join(parts + list(self.extra))

    @property
    def world(self) -> int:
        if self.devices is not None:
            return self.devices
        return 1 if self.strategy in ("auto", "cpu_bf16") else 2

    def overrides(self) -> list[str]:
        out = [f"stage={self.stage}", f"peft={self.peft}", f"strategy={self.strategy}",
               f"trainer.devices={self.world}", *BASE, *STAGE_OVERRIDES.get(self.stage, [])]
        if self.peft == "qlora" and not any(x.startswith("model=") for x in self.extra):
            out += QLORA_MODEL.get(self.stage, [])
        if self.precision:
            out.append(f"precision={self.precision}")
        return out + list(self.extra)


# Beyond the grid: precision where it matters, the other strategy choices, and the combinations the
# checks refuse (each must be refused with its reason, before any weights load).
EXTRA_CELLS = (
    Cell("sft", "qlora", "zero3", precision="bf16-true", note="4-bit weights stored as bf16"),
    Cell("sft", "qlora", "zero3", precision="bf16-mixed"),
    Cell("sft", "lora", "zero3", precision="bf16-mixed"),
    Cell("pretrain", "none", "ddp", devices=1, note="one DDP process is fine"),
    Cell("pretrain", "none", "zero1"),
    Cell("pretrain", "none", "zero3_offload"),
    Cell("sft", "lora", "zero3_offload"),
    Cell("pretrain", "none", "cpu_bf16"),
    Cell("sft", "lora", "cpu_bf16"),
)
REFUSED_CELLS = (
    Cell("pretrain", "none", "fsdp", devices=2),
    Cell("sft", "qlora", "fsdp", devices=2),
    Cell("pretrain", "none", "cpu_bf16", precision="32"),
    Cell("pretrain", "none", "cpu_bf16", devices=2),
    Cell("pretrain", "none", "ddp", precision="16-mixed", devices=2),
    Cell("sft", "qlora", "zero3", extra=("peft.quantization.quant_storage=uint8",)),
    Cell("sft", "qlora", "zero2", precision="bf16-true", extra=("peft.quantization.quant_storage=float32",)),
    Cell("pretrain", "qlora", "zero3", extra=("model=tiny",)),
)


def ci_subset(cells: list[Cell] | None = None) -> list[Cell]:
    """What CI reruns: QLoRA x ZeRO-3 for every stage (the headline combination), LoRA x ZeRO-3 for dpo
    (the reference is the policy with its adapter disabled, under partitioned weights), and every
    refusal. Other ZeRO-3 paths are compared against DDP in tests/test_distributed_llmlab.py
    (pretrain none/lora, sft with validation generation, ppo, qlora)."""
    cells = all_cells() if cells is None else cells
    return [c for c in cells if c in REFUSED_CELLS or (
        c.strategy == "zero3" and not c.precision and not c.extra
        and (c.peft == "qlora" or (c.stage, c.peft) == ("dpo", "lora")))]


def available_stages() -> list[str]:
    present = {p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml")}
    return [s for s in STAGE_ORDER if s in present] + sorted(present - set(STAGE_ORDER))


def grid(stages: list[str] | None = None) -> list[Cell]:
    return [Cell(stage, peft, strategy) for stage in (stages or available_stages())
            for peft in PEFTS for strategy in STRATEGIES]


def all_cells(stages: list[str] | None = None) -> list[Cell]:
    stages = stages or available_stages()
    return grid(stages) + [c for c in (*EXTRA_CELLS, *REFUSED_CELLS) if c.stage in stages]


# --------------------------------------------------------------------------------------------------
# Running llmlab.run
# --------------------------------------------------------------------------------------------------


def clean_env(threads: int = 1) -> dict[str, str]:
    """The caller's environment without launcher/cluster variables (Lightning would think Slurm or
    torchrun started the run), one thread per process (2 processes on a 2-core machine)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               PYTHONWARNINGS="ignore")
    return env


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def summary(self) -> dict:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def history(self) -> dict:
        path = self.run_dir / "history.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def losses(self, key: str = "train/loss") -> list[tuple[int, float]]:
        return [tuple(p) for p in self.history.get(key, [])]

    @property
    def refusal(self) -> str | None:
        """The one-line reason of a run refused by llmlab's checks (exit 2), else None."""
        if self.returncode != 2:
            return None
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("llmlab: error: ")]
        return lines[-1].removeprefix("llmlab: error: ") if lines else None

    def error_line(self) -> str:
        lines = [ln.strip() for ln in self.stderr.splitlines() if re.match(r"^\w*(Error|Exception)\b|^\w+Error:", ln.strip())]
        return lines[-1] if lines else (self.stderr.strip().splitlines() or ["?"])[-1]

    def describe(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.0f}s\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-6000:]}"


def launch(run_dir: Path, overrides: list[str], launcher: str = "lightning", nproc: int = 2,
           timeout: int = RUN_TIMEOUT_S, threads: int = 1) -> Result:
    """`python -m llmlab.run <overrides> hydra.run.dir=<run_dir>`; with `launcher="torchrun"` started by
    `torchrun --standalone --nproc-per-node <nproc>` instead of Lightning's own launcher."""
    run_dir = Path(run_dir)
    args = ["-m", "llmlab.run", *overrides, f"hydra.run.dir={run_dir}"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.time()
    try:
        # rank 0 forked from a warm interpreter where it can (tests/forkserver.py); a time limit ends its group
        proc = forkserver.try_run(args, clean_env(threads), ROOT, timeout, new_session=True) \
            if launcher != "torchrun" else None
        if proc is None:
            proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(threads), capture_output=True, text=True,
                                  timeout=timeout, start_new_session=True)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        _kill_group(exc)
        rc, out, err = 124, _text(exc.stdout), _text(exc.stderr) + f"\nTIMEOUT after {timeout}s (hang?)"
    return Result(rc, out, err, time.time() - t0, run_dir)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _kill_group(exc) -> None:
    """subprocess.run kills the child on timeout; its Lightning-launched rank 1 lives in the same
    (new) session, so end that process group too."""
    import signal

    pid = getattr(getattr(exc, "process", None), "pid", None)
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    cell: Cell
    status: str  # "pass" | "ran" | "refused" | "FAIL"
    detail: str  # pass: the losses; refused: the reason; FAIL: the error
    seconds: float

    def as_dict(self) -> dict:
        return {"key": self.cell.key, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 1)}


def judge(cell: Cell, result: Result) -> Outcome:
    if result.ok:
        summary = result.summary
        steps = summary.get("global_step")
        if steps != STEPS or summary.get("world_size") != cell.world:
            return Outcome(cell, "FAIL", f"finished with global_step={steps}, world_size={summary.get('world_size')}",
                           result.seconds)
        problems = _export_problems(cell, result.run_dir)
        if problems:
            return Outcome(cell, "FAIL", problems, result.seconds)
        detail = _progress(summary)
        return Outcome(cell, progress_status(detail), detail, result.seconds)
    if result.refusal:
        return Outcome(cell, "refused", result.refusal, result.seconds)
    return Outcome(cell, "FAIL", result.error_line(), result.seconds)


def progress_status(detail: str) -> str:
    """"pass" only when the numbers shown say the run learned: the loss fell (ppo: the reward rose) at
    the 3 decimals printed; a run that finished and exported but did not is "ran" (⚠️), not a pass.
    Judged on the printed numbers, so the document's statuses can be checked against its own text."""
    m = re.fullmatch(r"(loss|reward) (-?[\d.]+|nan) -> (-?[\d.]+|nan)", detail)
    if not m:
        return "ran"
    first, last = float(m.group(2)), float(m.group(3))
    return "pass" if (last < first if m.group(1) == "loss" else last > first) else "ran"


def _progress(summary: dict) -> str:
    """What the 2 steps did, in the stage's own terms (ppo has rewards, not a loss)."""
    for key, label in (("train_loss", "loss"), ("train_reward_mean", "reward")):
        first, last = summary.get(f"{key}_first"), summary.get(f"{key}_last")
        if isinstance(first, float) and isinstance(last, float):
            return f"{label} {first:.3f} -> {last:.3f}"
    return "ran"


def _export_problems(cell: Cell, run_dir: Path) -> str:
    """A finished run's hf/ must hold real weights (never the empty shards of a naive ZeRO-3 save)."""
    from safetensors import safe_open

    files = sorted((run_dir / "hf").glob("*.safetensors"))
    if not files:
        return "no hf/*.safetensors written"
    for f in files:
        with safe_open(str(f), "pt") as st:
            empty = [k for k in st.keys() if 0 in st.get_slice(k).get_shape()]
        if empty:
            return f"hf/ export has empty tensors: {empty[:3]}"
    return ""


def run_cells(cells: list[Cell], out_dir: Path, jobs: int = 2, log=print) -> list[Outcome]:
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(i_cell):
        i, cell = i_cell
        run_dir = out_dir / f"{i:03d}_{re.sub(r'[^A-Za-z0-9]+', '_', cell.key)[:80]}"
        outcome = judge(cell, launch(run_dir, cell.overrides()))
        log(f"[{outcome.seconds:5.0f}s] {outcome.status:7s} {cell.key}: {outcome.detail[:160]}")
        return outcome

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, enumerate(cells)))


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------

MARK = {"pass": "✅", "ran": "⚠️", "refused": "⛔", "FAIL": "❌"}


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "lightning", "deepspeed", "transformers", "peft", "bitsandbytes"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (absent)")
    return ", ".join(out)


def _cell_text(o: Outcome) -> str:
    if o.status in ("pass", "ran"):
        return f"{MARK[o.status]} {o.detail} ({o.seconds:.0f} s)"
    if o.status == "refused":
        return f"{MARK['refused']} refused: {_short(o.detail)}"
    return f"{MARK['FAIL']} {_short(o.detail)}"


def _short(text: str, n: int = 110) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def render(outcomes: list[Outcome], command: str, seconds: float, updated: str = "") -> str:
    by_key = {o.cell.key: o for o in outcomes}
    stages = [s for s in available_stages() if any(o.cell.stage == s for o in outcomes)]
    counts = {k: sum(o.status == k for o in outcomes) for k in MARK}
    lines = [
        "# Support matrix",
        "",
        "<!-- GENERATED by `python -m tests.support_matrix`; do not edit by hand. -->",
        "",
        f"Generated by running every combination through `python -m llmlab.run` for {STEPS} optimizer steps "
        "(2 CPU processes for ddp/zero*, one for auto/cpu_bf16), with validation (generation included), "
        "sample generation, checkpointing and the `hf/` export on. A cell passes (✅) when the run finished "
        f"{STEPS} steps with the expected world size, `hf/` holds real (non-empty) weights, and its training "
        f"loss fell over the {STEPS} steps (ppo: its mean reward rose) at the 3 decimals shown. ⚠️ ran: it "
        f"finished and exported, but {STEPS} steps did not visibly lower the loss (rm and dpo start at ln 2 = "
        f"0.693 and may move in the 4th decimal only; ppo's {STEPS} optimizer steps are one rollout, so its "
        f"first and last rewards are the same iteration's): "
        "the combination works, learning is not shown here (the default runs' tests show it). Refused "
        "means llmlab's checks stopped it before any weights loaded (exit 2) with the reason shown.",
        "",
        f"- command: `{command}` ({seconds / 60:.1f} min wall, 2 runs at a time)" + updated,
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; {_versions()}",
        f"- result: {counts['pass']} pass, {counts['ran']} ran without a visible fall in loss, "
        f"{counts['refused']} refused up front, {counts['FAIL']} failed",
        "- CI (`tests/test_support_matrix.py`) reruns a representative subset (`ci_subset()`: every stage "
        "with QLoRA under ZeRO-3, DPO with LoRA under ZeRO-3, and every refusal; "
        "`tests/test_distributed_llmlab.py` covers pretrain/sft/ppo under ZeRO-3 against DDP) and checks "
        "that this file lists the same outcome for each; the full matrix is regenerated with the command "
        "above (`LLMLAB_FULL_MATRIX=1` makes the test rerun all of it).",
        "",
        "Defaults: precision 32 (fp32), each stage's default model (pretrain: the tiny GPT-2 from scratch; "
        "sft: the cached pretrained tiny base; rm/dpo/ppo: the cached SFT'd one). QLoRA needs pretrained "
        "weights, so `stage=pretrain peft=qlora` continues the pretrained tiny base (`model=tiny_base`). "
        "Under ZeRO-3, QLoRA's 4-bit weights are stored in the dtype DeepSpeed keeps parameters in "
        "(fp32 here, bf16 with bf16 precisions), set automatically.",
        "",
    ]
    for stage in stages:
        lines += [f"## stage={stage}", "", "| peft | " + " | ".join(STRATEGIES) + " |",
                  "|---|" + "---|" * len(STRATEGIES)]
        for peft in PEFTS:
            row = [_cell_text(by_key[k]) if (k := Cell(stage, peft, s).key) in by_key else "not run"
                   for s in STRATEGIES]
            lines.append(f"| {peft} | " + " | ".join(row) + " |")
        lines.append("")
    extra = [o for o in outcomes if o.cell in EXTRA_CELLS]
    if extra:
        lines += ["## Other strategies and precisions", "", "| combination | outcome |", "|---|---|"]
        lines += [f"| `{o.cell.key}` | {_cell_text(o)} |" for o in extra]
        lines.append("")
    refused = [o for o in outcomes if o.cell in REFUSED_CELLS]
    if refused:
        lines += ["## Refused up front (with the fix)", "",
                  "Each is refused by `llmlab.checks.entry` before any weights load; the message is what the user sees.",
                  "", "| combination | outcome | message |", "|---|---|---|"]
        lines += [f"| `{o.cell.key}` | {MARK[o.status]} {o.status} | {o.detail.replace('|', chr(92) + '|')} |"
                  for o in refused]
        lines.append("")
    lines += family_section() + moe_section()
    lines += ["## Raw outcomes", "", "```json", json.dumps([o.as_dict() for o in outcomes], indent=1), "```", ""]
    return "\n".join(lines)


def family_section() -> list[str]:
    """The model-family dimension, as tests/test_families.py's slow tier runs it (in-process, 2 steps a cell) and
    its `REFUSED` / `STAGE_REFUSED` tables declare: sft x (full, lora, qlora, dora, lora_int8, ia3) (`test_family_matrix`), dpo, grpo, rm
    (`test_family_stage_matrix`), the hf/ export's logits (`test_family_export_logits`), generate + eval
    (`test_generate_and_eval_on_every_family`)."""
    from tests.families import FAMILIES
    from tests.test_families import CELLS, REFUSED, STAGE_CELLS, STAGE_REFUSED

    def mark(refused: dict, key) -> str:
        reason = refused.get(key)
        return "✅" if reason is None else f"refused: {reason[1] if isinstance(reason, tuple) else reason}"

    peft_name = {"none": "full"}
    lines = ["## Model families (model=hf)", "",
             "Tiny random models of each family (tests/families.py: 2 layers, 64 wide, 2 KV heads, a byte-level BPE "
             "tokenizer with the family's real chat template from TRL) loaded as `model=hf model.pretrained=<dir>`, "
             "each cell 2 optimizer steps in one CPU process (precision 32) by `tests/test_families.py` (slow tier; "
             "the fast tier runs sft lora on llama and qwen3_moe, dpo on llama, grpo on qwen3_moe). "
             "sft: multi-turn chat data, both steps with finite losses (`test_family_matrix`). "
             "dpo, rm: prompt/chosen/rejected string pairs; grpo: prompts, 2 rollouts of 2 x 4 sampled completions, a format "
             "reward (`test_family_stage_matrix`). ✅ there: finite losses and the weights that should train changed "
             "(dpo: only the adapter, the reference = the dir's weights bit for bit; rm: the new score head and the "
             "body, with LoRA only the adapters in it; its `hf/` export scores as the trained module under "
             "`AutoModelForSequenceClassification`). export: after 2 sft steps, the run's `hf/` (LoRA merged) reloaded by "
             "`AutoModelForCausalLM.from_pretrained` gives the trained module's logits (atol 1e-5, fp32) "
             "(`test_family_export_logits`). generate + eval: `llmlab.generate` greedy on plain prompts equals "
             "transformers' own greedy `generate`, `llmlab.eval eval=builtin` writes eval.json "
             "(`test_generate_and_eval_on_every_family`). LoRA targets are PEFT's per-architecture defaults, "
             "`all-linear` (every Linear but the head) for families PEFT has none for (phi3, qwen3_moe); dora and lora_int8 "
             "take LoRA's; ia3 takes PEFT's own IA3 table, and where it has no entry (phi3, qwen3_moe) or names a layer "
             "the family lacks (mixtral's `w2`, fused into one expert tensor in transformers 5) the run is refused "
             "before weights load, listing the family's linear layers to choose from.", "",
             "| family | " + " | ".join(f"sft {peft_name.get(c, c)}" for c in CELLS) + " | "
             + " | ".join(f"{stage} ({peft_name.get(peft, peft)})" for stage, peft in STAGE_CELLS)
             + " | export logits (full, lora) | generate + eval |",
             "|---|" + "---|" * (len(CELLS) + len(STAGE_CELLS) + 2)]
    for family in sorted(FAMILIES):
        cells = [mark(REFUSED, (family, c)) for c in CELLS] + [mark(STAGE_REFUSED, (family, *c)) for c in STAGE_CELLS]
        lines.append(f"| {family} | " + " | ".join(cells + ["✅", "✅"]) + " |")
    return lines + [""]


def moe_section() -> list[str]:
    """Mixture-of-experts families: the router's load-balancing loss and where LoRA goes (tests/test_moe.py)."""
    return ["### Mixture-of-experts (mixtral, qwen3_moe)", "",
            "| what | default | opt-in | checked by |", "|---|---|---|---|",
            "| router load-balancing loss | the model's config (off in Mixtral's and Qwen3-MoE's published configs) "
            "| `+model.config_overrides.output_router_logits=true`: loss + router_aux_loss_coef x aux over the real "
            "tokens, logged as train/router_aux_loss; pretrain, sft, dpo, orpo, simpo, kto (rm, ppo, grpo refuse it) "
            "| `tests/test_moe.py`: sft step loss = transformers' `labels=` loss (unpacked and packed), dpo step-0 "
            "loss = log 2 + coef x aux |",
            "| LoRA | attention only (mixtral: q_proj, v_proj; qwen3_moe: q/k/v/o_proj), dropout 0.05 "
            "| `peft.target_parameters=[experts.gate_up_proj,experts.down_proj] peft.dropout=0` (peft=lora; "
            "the router never) | `tests/test_moe.py`: the adapted tensors, their counts, training changes exactly "
            "those |", ""]


def parse_doc(text: str) -> dict[str, dict]:
    """The outcomes recorded in a generated document, by cell key."""
    m = re.search(r"## Raw outcomes\s+```json\n(.*?)\n```", text, re.S)
    return {d["key"]: d for d in json.loads(m.group(1))} if m else {}


def rejudge(doc: Path) -> int:
    """Apply today's pass rule to the numbers a document recorded (no runs), keeping its header."""
    text = doc.read_text()
    previous = parse_doc(text)
    outcomes = []
    for c in all_cells():
        if c.key in previous:
            d = previous[c.key]
            status = progress_status(d["detail"]) if d["status"] in ("pass", "ran") else d["status"]
            outcomes.append(Outcome(c, status, d["detail"], d["seconds"]))
    m = re.search(r"- command: `([^`]*)` \(([\d.]+) min wall.*?\)(.*)", text)
    command, seconds, updated = (m.group(1), float(m.group(2)) * 60, m.group(3)) if m else ("", 0.0, "")
    if "re-judged" not in updated:
        updated += "; statuses re-judged from the recorded numbers with `--rejudge`"
    doc.write_text(render(outcomes, command, seconds, updated))
    print(f"re-judged {len(outcomes)} cells in {doc}")
    return 0


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Cells whose key contains every `only` fragment (e.g. "stage=sft", "strategy=zero3")."""
    return [c for c in cells if all(f in c.key.split(" ") or f in c.key for f in only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--only", action="append", default=[], help="run cells whose key has this (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/support_matrix"), help="run dirs")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-write", action="store_true", help="print outcomes, leave the document alone")
    parser.add_argument("--rejudge", action="store_true",
                        help="run nothing: re-judge the document's recorded outcomes (progress_status) and rewrite it")
    args = parser.parse_args(argv)
    if args.rejudge:
        return rejudge(args.doc)
    cells = select(all_cells(), args.only)
    t0 = time.time()
    outcomes = run_cells(cells, args.out.resolve(), args.jobs)
    seconds = time.time() - t0
    if not args.no_write:
        if args.only:  # a partial rerun updates its cells in the existing document
            previous = parse_doc(args.doc.read_text()) if args.doc.is_file() else {}
            fresh = {o.cell.key for o in outcomes}
            outcomes += [Outcome(c, previous[c.key]["status"], previous[c.key]["detail"], previous[c.key]["seconds"])
                         for c in all_cells() if c.key in previous and c.key not in fresh]
            order = {c.key: i for i, c in enumerate(all_cells())}
            outcomes.sort(key=lambda o: order.get(o.cell.key, 1 << 30))
        command, updated = "python -m tests.support_matrix", ""
        if args.only:  # keep the full run's header; say which cells were rerun since
            text = args.doc.read_text() if args.doc.is_file() else ""
            m = re.search(r"- command: `([^`]*)` \(([\d.]+) min wall.*?\)(.*)", text)
            if m:
                command, seconds = m.group(1), float(m.group(2)) * 60
            earlier = m.group(3) if m else ""  # earlier partial reruns stay listed
            rerun = f"`--only {' --only '.join(args.only)}`"
            if not earlier.startswith("; cells rerun since with "):
                earlier = "; cells rerun since with"
            updated = earlier + ("," if earlier.endswith("`") else "") + f" {rerun}"
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(render(outcomes, command, seconds, updated))
        print(f"wrote {args.doc}")
    failed = [o for o in outcomes if o.status == "FAIL"]
    print(f"{len(outcomes) - len(failed)}/{len(outcomes)} cells pass or are refused up front; {seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
