"""`dry_run=true`: parameter counts and a memory estimate per device, summary.json, no training."""
from __future__ import annotations

import json
from pathlib import Path


def dry_run_report(cfg, module, info: dict, run_dir: Path) -> None:
    """`dry_run=true`: parameter counts and a memory estimate per device (llmlab/memory.py), no training."""
    from llmlab.memory import estimate_for_run, format_estimate

    memory = estimate_for_run(cfg, module)
    print(format_estimate(memory))
    summary = {**info, "status": "dry_run", "memory": memory, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return None
