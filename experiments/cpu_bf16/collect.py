"""cpu_bf16: tokens/s per width and precision from each run's summary.json, the bf16/fp32 ratios, the
bare-matmul ratio (matmul_*.json) -> results.{json,csv,md}, cpu_bf16.png."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import HERE, summaries, write_results  # noqa: E402

STUDY = "cpu_bf16"
PRECISIONS = {"fp32": "32-true", "bf16mixed": "bf16-mixed", "bf16true": "bf16-true"}
COLORS = {"32-true": "tab:blue", "bf16-mixed": "tab:orange", "bf16-true": "tab:green"}


def main() -> None:
    runs = summaries(STUDY)
    rows = []
    for label, s in runs.items():
        width, prec = label.split("_")
        rows.append({"label": label, "n_embd": int(width[1:]), "precision": s["precision"],
                     "params_M": round(s["total_params"] / 1e6, 2), "tokens_per_sec": s["tokens_per_sec"],
                     "wall_seconds": s["wall_seconds"], "peak_rss_mb": s["peak_rss_mb"],
                     "train_loss_last": s["train_loss_last"]})
    fp32 = {r["n_embd"]: r["tokens_per_sec"] for r in rows if r["precision"] == "32-true"}
    for r in rows:
        r["vs_fp32"] = round(r["tokens_per_sec"] / fp32[r["n_embd"]], 2) if r["n_embd"] in fp32 else None
    cols = ["n_embd", "params_M", "precision", "tokens_per_sec", "vs_fp32", "peak_rss_mb", "wall_seconds",
            "train_loss_last"]
    print(write_results(STUDY, rows, cols))
    matmul = [json.loads((HERE / STUDY / f).read_text()) for f in ("matmul_before.json", "matmul_after.json")
              if (HERE / STUDY / f).exists()]
    for m in matmul:
        print("matmul 2048^2, 1 thread:", m)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, prec in PRECISIONS.items():
        pts = sorted((r["n_embd"], r["tokens_per_sec"], r["vs_fp32"]) for r in rows if r["precision"] == prec)
        if not pts:
            continue
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=prec, color=COLORS[prec])
        if name != "fp32":
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"{prec} / fp32 (training)", color=COLORS[prec])
    for m, style in zip(matmul, ("--", ":")):
        ax2.axhline(m["bf16_over_fp32"], color="gray", ls=style,
                    label=f"bare 2048² matmul bf16/fp32 ({m['bf16_over_fp32']}, load {m['load']})")
    ax2.axhline(1.0, color="black", lw=0.5)
    ax1.set(xlabel="n_embd (4 layers)", ylabel="training tokens/s (1 thread)", yscale="log",
            title="Training speed by width")
    ax2.set(xlabel="n_embd (4 layers)", ylabel="speed relative to fp32", title="bf16 / fp32")
    ax1.legend(); ax2.legend(fontsize=7)
    cpu = matmul[0]["cpu"] if matmul else ""
    fig.suptitle(f"{cpu}, amx_bf16={matmul[0]['amx_bf16'] if matmul else '?'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / STUDY / "cpu_bf16.png", dpi=100)


if __name__ == "__main__":
    main()
