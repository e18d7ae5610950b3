"""The plain PyTorch pretraining loop the benchmarks compare llmlab against (and profile).

Same model, packed built-in blocks, batch, AdamW parameter groups, cosine warm-up schedule, clipping and
precision as `python -m llmlab.run` with the same overrides; only the framework around the step differs.

    python bench/plain_loop.py STEPS PRECISION VARIANT CONF_DIR [hydra overrides...]

prints one JSON line: tokens_per_sec, tokens_per_cpu_sec, params, losses. PRECISION: 32 | bf16-mixed |
bf16-true; VARIANT: plain, or containing "fused" (fused AdamW) and/or "compile" (torch.compile).
"""
from __future__ import annotations

import json
import sys
import time

import torch


def build(conf_dir: str, overrides: list[str], precision: str, fused: bool | None = None):
    """(cfg, model, loader, optimizer) as llmlab's pretrain stage would build them."""
    from hydra import compose, initialize_config_dir

    from llmlab.data.datamodule import LLMDataModule
    from llmlab.models.build import build_model, build_tokenizer
    from llmlab.optim import param_groups

    with initialize_config_dir(conf_dir, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer(cfg.model)
    dm = LLMDataModule(cfg.data, "lm", tok, seed=cfg.seed)
    dm.setup()
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=cfg.data.batch_size, shuffle=True,
                                         collate_fn=dm.format.collate, drop_last=True)
    model = build_model(cfg.model, tok)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    o = cfg.stage.module.optimizer
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), fused=fused)
    return cfg, model, loader, opt


def train(steps: int, precision: str, variant: str, conf_dir: str, overrides: list[str]) -> dict:
    from llmlab.losses import causal_lm_loss
    from llmlab.optim import warmup_schedule
    from llmlab.stages.common import count_tokens, forward_logits

    cfg, model, loader, opt = build(conf_dir, overrides, precision, fused=True if "fused" in variant else None)
    sched = warmup_schedule(opt, steps, name="cosine", warmup_steps=cfg.stage.module.scheduler.warmup_steps)
    fwd = torch.compile(model) if "compile" in variant else model
    model.train()
    tokens, t_last, seconds, cpu, losses = 0, None, 0.0, 0.0, []
    it = iter(loader)
    for _ in range(steps):
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = causal_lm_loss(forward_logits(fwd, batch, "document"), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        now = (time.perf_counter(), time.process_time())
        if t_last is not None:  # like llmlab's RunSummary: the first step is not timed
            seconds += now[0] - t_last[0]
            cpu += now[1] - t_last[1]
            tokens += count_tokens(batch)
        t_last = now
    return {"tokens_per_sec": tokens / seconds, "tokens_per_cpu_sec": tokens / cpu,
            "params": sum(p.numel() for p in model.parameters()), "losses": losses}


if __name__ == "__main__":
    steps, precision, variant, conf_dir, *overrides = sys.argv[1:]
    print(json.dumps(train(int(steps), precision, variant, conf_dir, overrides)))
