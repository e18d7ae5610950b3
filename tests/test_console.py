"""What the default job prints: each message once, no warnings, a progress line and a results table."""
from __future__ import annotations

import logging
import re

import pytest

from conftest import FAST, assert_ok
from llmlab.console import NOISE, ConsoleFormatter, is_noise

# Warnings a run may print on the console and why (empty: none today). Keep it short and commented.
ALLOWED_WARNINGS: tuple[str, ...] = ()


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_default_job_console_is_quiet_and_says_each_thing_once(cli):
    overrides = [o for o in FAST if not o.startswith("trainer.enable_progress_bar")]
    run = cli(*overrides)
    assert_ok(run)
    lines = [line.rstrip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    warnings = [line for line in lines if re.search(r"warn|deprecat|Tip:|litlogger", line, re.IGNORECASE)
                and not any(re.search(a, line) for a in ALLOWED_WARNINGS)]
    assert not warnings, f"warnings on the console: {warnings}"
    assert not any("Epoch" in line or "FLOPs" in line for line in lines), lines
    assert re.search(r"^step 6/6  loss \d+\.\d+  [\d,]+ tok/s", run.stdout, re.MULTILINE), run.stdout
    # the end: a table with the validation metric's first -> last and the outputs' paths, no dict
    assert re.search(r"val_loss\s+[\d.]+ -> [\d.]+", run.stdout), run.stdout
    for name in ("summary.json", "loss.png", "hf"):
        assert str(run.dir / name) in run.stdout
    assert "{'stage'" not in run.stdout
    # the run's log file keeps every record, timestamped
    assert "model tiny:" in (run.dir / "run.log").read_text()


def test_noise_patterns_match_the_messages_they_name():
    examples = [
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)",
        "`Trainer(limit_val_batches=1.0)` was configured so 100% of the batches will be used..",
        "TPU available: False, using: 0 TPU cores",
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        "The `srun` command is available on your system but is not used. HINT: If your intention is to run",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.",
        "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an",
        "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
        "Warning: Detected no triton, on systems without Triton certain kernels will not work",
    ]
    assert len(examples) == len(NOISE)
    assert all(is_noise(m) for m in examples)
    for message in ("GPU available: False, used: False", "model tiny: 859,264 params", "val/loss is nan",
                    "step 3/6  loss 2.1"):
        assert not is_noise(message), message


def test_console_formatter_names_level_and_source_of_warnings_only():
    fmt = ConsoleFormatter("%(message)s")

    def record(level):
        return logging.LogRecord("llmlab.x", level, __file__, 1, "hello %s", ("you",), None)

    assert fmt.format(record(logging.INFO)) == "hello you"
    assert fmt.format(record(logging.WARNING)) == "warning [llmlab.x]: hello you"
