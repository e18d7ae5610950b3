"""One optimizer step is the same update however its examples are split: batch 6 x accumulation 1 ==
batch 2 x accumulation 3 == 2 processes x batch 3 (DDP, ZeRO-2), for SFT and DPO with its NLL term,
through the real CLI (issue 9). The examples' target counts differ ~100x, so a mean of per-micro-batch
means (the old behaviour) gives a visibly different update.

Plain SGD without clipping or schedule: the update is lr x the gradient, so any weighting or scaling
error shows in the weights (AdamW's first step, ~lr x sign(g), would hide most of it). The sampler maps
global sample positions 0..5 to the same six examples in all three layouts (ResumableSampler: one process
takes positions 0..5 in order; rank r of 2 takes r, r+2, r+4), so the three runs see the same six rows.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_ok

LENGTHS = (1, 4, 12, 30, 70, 110)  # response characters (= tokens with the byte tokenizer), + EOS
COMMON = ["model=tiny", "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2",
          "data=text", "data.block_size=128", "data.val_fraction=0.5", "precision=32",
          "trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
          "trainer.gradient_clip_val=null", "trainer.enable_progress_bar=false",
          "stage.module.optimizer._target_=torch.optim.SGD", "~stage.module.optimizer.betas",
          "stage.module.optimizer.lr=1.0", "stage.module.optimizer.weight_decay=0.0", "stage.module.scheduler=null",
          "stage.module.eval_generation=false"]
LAYOUTS = {
    "batch6": ["data.batch_size=6"],
    "batch2_accum3": ["data.batch_size=2", "trainer.accumulate_grad_batches=3"],
    "ddp2_batch3": ["trainer.devices=2", "strategy=ddp", "data.batch_size=3"],
}


def _text(n: int, salt: int) -> str:
    return "".join("abcdefgh"[(i * 3 + salt) % 8] for i in range(n))


def write_data(tmp_path, stage: str):
    """Six training records (and two validation ones) whose targets range from 2 to 111 tokens."""
    if stage == "sft":
        rows = [{"prompt": f"p{i}", "response": _text(n, i)} for i, n in enumerate(LENGTHS)]
    else:  # chosen answers of very different lengths (the NLL term), short rejected ones
        rows = [{"prompt": f"p{i}", "chosen": _text(n, i), "rejected": _text(1 + i, i + 1)}
                for i, n in enumerate(LENGTHS)]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return [f"data.train_files={train}", f"data.val_files={val}"]


def weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.dir / "hf" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


STAGES = {
    "sft": ["stage=sft"],
    "dpo": ["stage=dpo", "stage.module.sft_weight=1.0"],  # the token-weighted NLL term on the chosen rows
}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_one_step_is_the_same_update_for_every_split(cli, tmp_path, stage):
    data = write_data(tmp_path, stage)
    runs = {name: cli(*STAGES[stage], *COMMON, *data, *extra) for name, extra in LAYOUTS.items()}
    for run in runs.values():
        assert_ok(run)
    ref = weights(runs["batch6"])
    for name in ("batch2_accum3", "ddp2_batch3"):
        assert max_diff(weights(runs[name]), ref) < 1e-5, name
