"""What a run prints: each message once, no advertisements, no warnings that do not concern the user.

Hydra's `hydra/job_logging=llmlab` (conf/hydra/job_logging/llmlab.yaml) sends every record to the
console through `ConsoleFormatter` + `DropNoise` and, unfiltered and timestamped, to `<run dir>/run.log`.
`quiet_libraries()` runs first thing in a run (before peft, torchao and DeepSpeed are imported: they
speak as they import) and stops the libraries' own output paths (Lightning's own stderr handler: every
message twice; transformers' tqdm bars; DeepSpeed's accelerator notice) and the warnings in `NOISE` below. Only the standard library is imported here:
Hydra loads this module while it configures logging, before any run starts.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

# Messages about the libraries' own state, not about the user's run, each with why it is dropped.
# tests/test_console.py runs the default job and fails on any warning outside this list.
NOISE: tuple[tuple[str, str], ...] = (
    (r"Tip: For seamless cloud logging", "Lightning's LitLogger advertisement"),
    (r"`Trainer\(limit_\w+=1\.0\)` was configured", "restates a default"),
    (r"^TPU available: False", "no TPU anywhere near this project"),
    (r"Setting (ds_)?accelerator to", "DeepSpeed picks its accelerator when transformers imports it, used or not"),
    (r"The `srun` command is available on your system but is not used",
     "Lightning sees a Slurm install; a local run is intended (launcher=slurm is how llmlab uses Slurm)"),
    (r"isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning's own use of a torch API"),
    (r"is an Enum subclass and is now natively supported by torch.compile", "torchao's import on torch 2.13"),
    (r"^Failed to load .*torchao.*\.so", "torchao's CUDA kernels on a CPU machine"),
    (r"Detected no triton", "torchao: Triton kernels are GPU-only"),
)
_NOISE = re.compile("|".join(f"(?:{pattern})" for pattern, _ in NOISE))


def is_noise(message: str) -> bool:
    return bool(_NOISE.search(message))


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


class ConsoleFormatter(logging.Formatter):
    """INFO as the bare message; a warning or error says its level and where it came from."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()} [{record.name}]: {text}"
        return text


def quiet_libraries() -> None:
    """Call before a run builds anything (train.py does, first thing): before peft, torchao or DeepSpeed
    is imported."""
    for pattern, _ in NOISE:  # warnings.warn(...) paths (Lightning's rank_zero_warn among them)
        warnings.filterwarnings("ignore", message=f".*(?:{pattern})")
    # loggers with handlers of their own (records never reach the console handler's filter)
    for name in ("DeepSpeed", "torch.utils._pytree", "torchao", "torchao.kernel.intmm"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
    # lazy (here and below): Hydra loads this module while it configures logging, before any run
    import lightning.pytorch  # noqa: F401  (its import attaches the handler removed below)

    # Lightning prints through a stderr handler of its own when it is imported before logging is
    # configured, and Hydra's root handler prints the same record again: keep the root's only.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards 1/1" after every export of a small model


def print_summary(result: dict, run_dir) -> None:
    """The end of a run: a short table of the key results and where the outputs are (all of it in
    summary.json)."""
    # lazy: only the standard library at module level (Hydra loads this module to configure logging)
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(run_dir)
    table = Table(title=f"{result.get('stage')} run: {result.get('status')}", show_header=False, box=None,
                  title_justify="left", padding=(0, 2))
    setup = " ".join(f"{k}={result[k]}" for k in ("model", "peft", "precision", "strategy") if k in result)
    table.add_row("setup", setup)
    table.add_row("steps", str(result.get("global_step")))
    for key in sorted(result):
        if key.startswith("val_") and key.endswith("_last") and isinstance(result[key], (int, float)):
            name = key[: -len("_last")]
            first = result.get(f"{name}_first")
            start = f"{first:.4g} -> " if isinstance(first, (int, float)) else ""
            table.add_row(name, f"{start}{result[key]:.4g}")
    for key, label in (("reward_mean_first", "reward (first tenth)"), ("reward_mean_last", "reward (last tenth)"),
                       ("kl_last", "kl"), ("skipped_steps", "skipped steps")):
        if isinstance(result.get(key), (int, float)):
            table.add_row(label, f"{result[key]:.4g}")
    if result.get("tokens_per_sec"):
        table.add_row("tokens/s", f"{result['tokens_per_sec']:,.0f}")
    table.add_row("time", f"{result.get('wall_seconds', 0):.0f} s, peak RSS {result.get('peak_rss_mb', 0):,.0f} MB")
    Console().print(table)
    # paths as plain lines: a table would cut long ones to the terminal's width
    for name in ("summary.json", "loss.png", "hf", "hf_adapter", "checkpoints/last.ckpt"):
        if (run_dir / name).exists():
            print(f"  {name:<22} {run_dir / name}")
