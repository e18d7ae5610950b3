"""alignment_methods: per method from one SFT start: held-out reward accuracy (preference stages), sampled
reward (RL stages), greedy exact match before/after, KL where the stage logs it, wall time, from each run's
summary.json -> results.{json,csv,md}, alignment_methods.png."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import HERE, summaries, write_results  # noqa: E402

STUDY = "alignment_methods"
KEYS = ["val_exact_match_first", "val_exact_match_last", "val_reward_accuracy_first", "val_reward_accuracy_last",
        "val_reward_margin_first", "val_reward_margin_last", "val_reward_mean_first", "val_reward_mean_last",
        "train_reward_mean_first", "train_reward_mean_last", "train_kl_last", "val_kl_last"]


def main() -> None:
    rows = []
    for label, s in summaries(STUDY).items():
        row = {"method": label, "stage": s["stage"], "model": s["model"], "steps": s["global_step"],
               **{k: s.get(k) for k in KEYS}, "wall_seconds": s["wall_seconds"], "peak_rss_mb": s["peak_rss_mb"],
               "status": s["status"]}
        # KL to the start as the stage logs it: ppo's KL of its last rollout (train/kl), kto's held-out
        # reference point (val/kl: its batch KL estimate, clamped at 0 in training); the others log none
        row["kl"] = s.get("train_kl_last") if s["stage"] == "ppo" else s.get("val_kl_last")
        # sampled (rollout) task reward, mean over the first / last tenth of the rollouts (RL stages only)
        row["rollout_reward_first"] = s.get("reward_mean_first")
        row["rollout_reward_last"] = s.get("reward_mean_last")
        rows.append(row)
    cols = ["method", "steps", "val_exact_match_first", "val_exact_match_last", "val_reward_accuracy_first",
            "val_reward_accuracy_last", "val_reward_margin_last", "val_reward_mean_first", "val_reward_mean_last",
            "rollout_reward_first", "rollout_reward_last", "kl", "wall_seconds", "peak_rss_mb"]
    print(write_results(STUDY, rows, cols))

    names = [r["method"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar([i - 0.2 for i in x], [r["val_exact_match_first"] or 0 for r in rows], 0.4, label="before", color="gray")
    ax1.bar([i + 0.2 for i in x], [r["val_exact_match_last"] or 0 for r in rows], 0.4, label="after")
    ax1.set(xticks=list(x), xticklabels=names, ylabel="greedy exact match, 200 held-out prompts",
            title="Exact match from the same SFT start")
    ax1.legend(fontsize=8)
    for i, r in enumerate(rows):
        if r["val_reward_accuracy_last"] is not None:
            ax2.bar(i - 0.2, r["val_reward_accuracy_first"] or 0, 0.4, color="gray")
            ax2.bar(i + 0.2, r["val_reward_accuracy_last"], 0.4, color="tab:orange")
        elif r["rollout_reward_last"] is not None:
            ax2.bar(i - 0.2, r["rollout_reward_first"] or 0, 0.4, color="gray")
            ax2.bar(i + 0.2, r["rollout_reward_last"], 0.4, color="tab:green")
    ax2.set(xticks=list(x), xticklabels=names, ylim=(0, 1.05),
            title="before (gray) -> after: held-out reward accuracy (orange)\nor sampled task reward, first -> last tenth of rollouts (green)")
    ax2.title.set_fontsize(9)
    fig.suptitle("start: model=tiny_sft_short; preference stages 150 steps (default), grpo 30 of 60 rollouts, "
                 "ppo 10 of 50 iterations", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / STUDY / "alignment_methods.png", dpi=100)


if __name__ == "__main__":
    main()
