"""strategies: per-process memory and step time of ddp / ZeRO 1/2/3 on 2 CPU processes, read from
bench/strategies.py's output (rerun.md here after run.sh, else the section of bench/RESULTS.md this
study cites) -> results.{json,csv,md}, strategies.png (bars)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import HERE, ROOT, write_results  # noqa: E402

STUDY = "strategies"
# column headers as bench/RESULTS.md's hand-made table and bench/strategies.py's own table name them
COLUMNS = {"step_s": ("step s", "step time (s)"), "peak_rss_mb": ("step peak", "peak rss in training (mb)"),
           "layout_mb": ("layout (mb)", "states / process, fp32 layout (mb)"),
           "train_start_mb": ("rss at train start", "rss at train start (mb)"),
           "fwd_bwd_peak_mb": ("peak fwd+bwd", "peak in fwd+bwd (mb)"),
           "after_backward_mb": ("rss after backward", "rss after backward (mb)"),
           "optimizer_step_peak_mb": ("peak optimizer step", "peak in optimizer step (mb)")}
CITED = "**2. Where the peak is**"  # bench/RESULTS.md, "strategies: DDP scaling, ZeRO 1/2/3 memory, cpu_bf16"


def number(cell: str) -> float:
    return float(re.sub(r"[*,x]", "", cell.strip()).split()[0])


def parse_table(text: str) -> list[dict]:
    """The first markdown table in `text` whose header names a strategy column."""
    lines = [ln for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| strategy"))
    header = [h.strip().strip("*").lower() for h in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        row = {"strategy": cells["strategy"]}
        for key, names in COLUMNS.items():
            name = next((n for n in names if n in cells), None)
            if name is not None:
                row[key] = number(cells[name])
        rows.append(row)
    return rows


def main() -> None:
    rerun = HERE / STUDY / "rerun.md"
    if rerun.exists():
        source, rows = "experiments/strategies/rerun.md", parse_table(rerun.read_text())
    else:
        text = (ROOT / "bench" / "RESULTS.md").read_text()
        source, rows = "bench/RESULTS.md (strategies, table 2)", parse_table(text[text.index(CITED):])
    ddp = next(r for r in rows if r["strategy"] == "ddp")
    for r in rows:
        r["peak_vs_ddp"] = round(r["peak_rss_mb"] / ddp["peak_rss_mb"], 2)
        r["step_vs_ddp"] = round(r["step_s"] / ddp["step_s"], 2)
        r["source"] = source
    cols = ["strategy", "layout_mb", "train_start_mb", "fwd_bwd_peak_mb", "after_backward_mb",
            "optimizer_step_peak_mb", "peak_rss_mb", "peak_vs_ddp", "step_s", "step_vs_ddp"]
    print(f"source: {source}\n" + write_results(STUDY, rows, cols))

    names = [r["strategy"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    w = 0.2
    for i, (key, label) in enumerate([("layout_mb", "weights+grads+Adam (layout)"),
                                      ("after_backward_mb", "RSS after backward"),
                                      ("fwd_bwd_peak_mb", "peak in fwd+bwd"), ("peak_rss_mb", "step peak")]):
        ax1.bar([j + (i - 1.5) * w for j in x], [r.get(key, 0) for r in rows], w, label=label)
    ax1.set(xticks=list(x), xticklabels=names, ylabel="MB per process (larger rank)",
            title="Per-process memory, 202M GPT-2, 2 CPU processes")
    ax1.legend(fontsize=7)
    ax2.bar(list(x), [r["step_s"] for r in rows], color="tab:gray")
    ax2.set(xticks=list(x), xticklabels=names, ylabel="seconds per step (median)", title="Step time")
    fig.suptitle(f"source: {source}", fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / STUDY / "strategies.png", dpi=100)


if __name__ == "__main__":
    main()
