"""Pretraining tokens/s: llmlab (`python -m llmlab.run`) vs a plain PyTorch loop, and bf16 vs fp32.

Both sides use the same tiny model, the same packed built-in blocks, the same batch, optimizer,
gradient clipping, LR schedule and precision; only the framework around the step differs. Every
measurement runs in its own subprocess and the two sides alternate, so machine noise hits both
(this machine is shared); ratios are taken between neighbours, then the median is reported.

    .venv/bin/python bench/pretrain_throughput.py [--steps 60] [--repeats 3] [--out bench/out]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
          "callbacks.samples.prompts=[]", "data.n_train=4000"]


def llmlab_tokens_per_sec(steps: int, precision: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "llmlab.run", *COMMON, f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", f"precision={precision}", f"hydra.run.dir={d}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads((Path(d) / "summary.json").read_text())["tokens_per_sec"]


PLAIN = r'''
import sys, time, torch
from hydra import compose, initialize_config_dir
from llmlab.data.datamodule import LLMDataModule
from llmlab.losses import causal_lm_loss
from llmlab.models import build_model, build_tokenizer
from llmlab.optim import param_groups, warmup_schedule
from llmlab.stages.common import count_tokens, forward_logits

steps, precision = int(sys.argv[1]), sys.argv[2]
with initialize_config_dir(sys.argv[3], version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[4:])
torch.manual_seed(cfg.seed)
tok = build_tokenizer(cfg.model)
dm = LLMDataModule(cfg.data, "lm", tok, seed=cfg.seed)
dm.setup()
loader = torch.utils.data.DataLoader(dm.train_set, batch_size=cfg.data.batch_size, shuffle=True,
                                     collate_fn=dm.format.collate, drop_last=True)
model = build_model(cfg.model, tok)
if precision == "bf16-true":
    model = model.to(torch.bfloat16)
opt_cfg = cfg.stage.module.optimizer
opt = torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas))
sched = warmup_schedule(opt, steps, name="cosine", warmup_steps=cfg.stage.module.scheduler.warmup_steps)
autocast = precision == "bf16-mixed"
model.train()
tokens, t_last, seconds = 0, None, 0.0
it = iter(loader)
for step in range(steps):
    batch = next(it)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(forward_logits(model, batch, "document"), batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    now = time.perf_counter()
    if t_last is not None:  # like llmlab's RunSummary: the first step is not timed
        seconds += now - t_last
        tokens += count_tokens(batch)
    t_last = now
print(tokens / seconds)
'''

LIGHTNING_PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true"}


def plain_tokens_per_sec(steps: int, precision: str) -> float:
    out = subprocess.run([sys.executable, "-c", PLAIN, str(steps), precision, str(ROOT / "conf"), "data.n_train=4000"],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = {p: {"llmlab": [], "plain": []} for p in LIGHTNING_PRECISION}
    t0 = time.time()
    for r in range(args.repeats):
        for p in LIGHTNING_PRECISION:
            rows[p]["plain"].append(plain_tokens_per_sec(args.steps, p))
            rows[p]["llmlab"].append(llmlab_tokens_per_sec(args.steps, p))
            print(f"repeat {r} {p}: plain {rows[p]['plain'][-1]:.0f} tok/s, llmlab {rows[p]['llmlab'][-1]:.0f} tok/s",
                  flush=True)
    print(f"\n{args.steps} steps, batch 16 x 128 tokens, tiny GPT-2 (4 layers, 128 wide), {args.repeats} repeats, "
          f"{time.time() - t0:.0f} s")
    print("| precision | plain tok/s (median) | llmlab tok/s (median) | llmlab / plain (median of paired ratios) |")
    print("|---|---|---|---|")
    for p, r in rows.items():
        ratio = statistics.median(a / b for a, b in zip(r["llmlab"], r["plain"]))
        print(f"| {p} | {statistics.median(r['plain']):.0f} | {statistics.median(r['llmlab']):.0f} | {ratio:.2f} |")
    base = rows["32"]
    for p in ("bf16-mixed", "bf16-true"):
        ratio = statistics.median(a / b for a, b in zip(rows[p]["llmlab"], base["llmlab"]))
        print(f"llmlab {p} / fp32: {ratio:.2f}x")


if __name__ == "__main__":
    main()
