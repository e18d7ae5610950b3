"""peft_methods: trainable parameters, peak RSS, tokens/s, held-out exact match and loss, wall time per
PEFT method, from each run's summary.json -> results.{json,csv,md}, peft_methods.png."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import HERE, summaries, write_results  # noqa: E402

STUDY = "peft_methods"


def main() -> None:
    rows = []
    for label, s in summaries(STUDY).items():
        rows.append({"peft": label, "trainable_params": s["trainable_params"], "total_params": s["total_params"],
                     "trainable_pct": round(100 * s["trainable_params"] / s["total_params"], 2),
                     "peak_rss_mb": s["peak_rss_mb"], "tokens_per_sec": s["tokens_per_sec"],
                     "val_exact_match_first": s.get("val_exact_match_first"),
                     "val_exact_match_last": s.get("val_exact_match_last"),
                     "val_loss_first": s.get("val_loss_first"), "val_loss_last": s.get("val_loss_last"),
                     "wall_seconds": s["wall_seconds"], "steps": s["global_step"], "status": s["status"]})
    cols = ["peft", "trainable_params", "trainable_pct", "peak_rss_mb", "tokens_per_sec", "val_exact_match_first",
            "val_exact_match_last", "val_loss_first", "val_loss_last", "wall_seconds", "steps"]
    print(write_results(STUDY, rows, cols))

    names = [r["peft"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    panels = [("trainable_params", "trainable parameters", True), ("peak_rss_mb", "peak RSS (MB)", False),
              ("tokens_per_sec", "training tokens/s (1 thread)", False),
              ("val_loss_last", "held-out loss after (before: %.2f)" % rows[0]["val_loss_first"] if rows else "", False),
              ("val_exact_match_last", "held-out exact match after", False)]
    for ax, (key, title, log) in zip(axes, panels):
        ax.bar(names, [r[key] or 0 for r in rows], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        if log:
            ax.set_yscale("log")
        if key == "val_exact_match_last":  # a share: on its full scale, so 1 of 200 does not look like a win
            ax.set_ylim(0, 1)
    fig.suptitle("stage=sft, tiny base (0.86M params), 200 of the recipe's 800 steps, batch 64", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / STUDY / "peft_methods.png", dpi=100)


if __name__ == "__main__":
    main()
