"""RunSummary: one machine-readable summary.json per run, plus loss.png.

Records every logged train/val scalar as a (step, value) history, training throughput (tokens/s,
validation time excluded), peak RSS and wall time. Validation runs once before the first step
(`trainer.num_sanity_val_steps=-1` over the whole validation set), so `*_first` values describe the
model as it started and `*_last` as it ended. Rank 0 writes; metrics are already reduced across ranks.

It is the one writer of summary.json during a fit: the stage module and callbacks add their own keys
through `summary_values(summary)` (`llmlab.stages.interface.SummarySource`), asked once at fit end;
`train.py` reads the result from `RunSummary.written` rather than from the file.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch

from llmlab.checkpointing.atomic import atomic_write_text
from llmlab.stages.common import count_tokens
from llmlab.stages.interface import SummarySource


def _scalar(v) -> float | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().float()
        if v.numel() != 1:
            return None
        v = v.item()
    return float(v) if isinstance(v, (int, float)) else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunSummary(L.Callback):
    def __init__(self, run_dir: str, info: dict | None = None, filename: str = "summary.json"):
        self.run_dir, self.info, self.filename = Path(run_dir), dict(info or {}), filename
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.written: dict | None = None  # the summary as last written (rank 0)
        self.train_tokens, self.train_seconds, self._t_last = 0, 0.0, None
        self._t_start = time.perf_counter()

    # --- resume (resume=auto, Slurm requeue): the history before the interruption travels in the
    # checkpoint, so history.json, loss.png and the *_first values describe the whole run ---
    def state_dict(self) -> dict:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()},
                "train_tokens": self.train_tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}
        self.train_tokens = state_dict.get("train_tokens", 0)
        self.train_seconds = state_dict.get("train_seconds", 0.0)

    def _record(self, trainer, prefix: str):
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and (v := _scalar(value)) is not None:
                points = self.history.setdefault(key, [])
                while points and points[-1][0] >= trainer.global_step:  # a resumed run redoes a step:
                    points.pop()  # its new value replaces the old one, steps stay increasing
                points.append((trainer.global_step, v))

    # --- throughput: time between consecutive train batch ends, validation excluded ---
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._t_last is not None:
            self.train_seconds += now - self._t_last
            self.train_tokens += count_tokens(batch) * trainer.world_size
        self._t_last = now
        self._record(trainer, "train/")

    def on_validation_start(self, trainer, pl_module):
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._t_last is not None:
            self._t_last += time.perf_counter() - self._t_val
        self._record(trainer, "val/")

    def summary(self, trainer, sources=()) -> dict:
        """The run's summary; each of `sources` (SummarySource: the stage, callbacks) adds its keys last."""
        out = {
            **self.info,
            "status": "finished",
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "tokens_per_sec": round(self.train_tokens / self.train_seconds, 2) if self.train_seconds else None,
            "train_tokens_timed": self.train_tokens,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wall_seconds": round(time.perf_counter() - self._t_start, 2),
            "run_dir": str(self.run_dir),
        }
        for key, points in sorted(self.history.items()):
            name = key.replace("/", "_")
            out[f"{name}_first"], out[f"{name}_last"] = points[0][1], points[-1][1]
        for source in sources:
            out.update(source.summary_values(dict(out)))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            # callbacks first (the NaN guard's status=diverged), then the stage (its literal keys)
            sources = [s for s in (*trainer.callbacks, pl_module) if s is not self and isinstance(s, SummarySource)]
            self.write(trainer, sources)

    def write(self, trainer, sources=()) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary = self.written = self.summary(trainer, sources)
        # a kill -9 while writing leaves the previous file whole, never a torn one
        atomic_write_text(self.run_dir / self.filename, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(self.run_dir / "history.json", json.dumps(self.history) + "\n")
        plot_losses(self.history, self.run_dir / "loss.png")
        return summary


def plot_losses(history: dict, path: Path) -> None:
    # lazy: pyplot only after the Agg backend is chosen (no display needed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if history.get(key):
            steps, values = zip(*history[key])
            ax.plot(steps, values, style, label=key, alpha=0.8 if key == "train/loss" else 1.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
