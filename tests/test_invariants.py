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
    "ddp2_batch1_accum3": ["trainer.devices=2", "strategy=ddp", "data.batch_size=1",
                           "trainer.accumulate_grad_batches=3"],
    # DeepSpeed divides by its gradient_accumulation_steps on top of Lightning (common.for_backward)
    "zero2_batch1_accum3": ["trainer.devices=2", "strategy=zero2", "data.batch_size=1",
                            "trainer.accumulate_grad_batches=3"],
    "zero3_batch1_accum3": ["trainer.devices=2", "strategy=zero3", "data.batch_size=1",
                            "trainer.accumulate_grad_batches=3"],
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
    # chosen and rejected halves through the policy one at a time (activation checkpointing)
    "dpo-split": ["stage=dpo", "stage.module.sft_weight=1.0", "stage.module.split_pairs=true"],
}


CASES = [  # (stage, layouts compared with batch6). Fast tier: one run that accumulates over 2 ranks
    # (~85 s for the two stages on an idle 2-core machine); slow tier: each layout alone, and ZeRO-2
    pytest.param("sft", ["ddp2_batch1_accum3"], id="sft"),
    pytest.param("dpo", ["ddp2_batch1_accum3"], id="dpo"),
    pytest.param("sft", ["batch2_accum3", "ddp2_batch3"], id="sft-each", marks=pytest.mark.slow),
    pytest.param("dpo", ["batch2_accum3", "ddp2_batch3"], id="dpo-each", marks=pytest.mark.slow),
    pytest.param("sft", ["zero2_batch1_accum3"], id="sft-zero2", marks=pytest.mark.slow),
    # split_pairs recomputes each half's activations in backward: still the same update under DDP
    # (one DDP forward per training_step, each parameter's gradient hook once) and under ZeRO-3
    # (partitioned parameters gathered again for the recomputation)
    pytest.param("dpo-split", ["ddp2_batch1_accum3", "zero3_batch1_accum3"], id="dpo-split", marks=pytest.mark.slow),
]


@pytest.mark.distributed
@pytest.mark.parametrize("stage,layouts", CASES)
def test_one_step_is_the_same_update_for_every_split(cli, tmp_path, stage, layouts):
    """Fails on the old per-micro-batch means (measured, max |weight difference| vs batch 6): 2 ranks x 1
    x accumulation 3: sft 0.257, dpo 0.257; batch 2 x accumulation 3: sft 0.098 (relative L2 of the
    update 0.20), dpo 0.098 (0.072); 2 ranks x 3: 5e-4. Now all < 2e-7."""
    data = write_data(tmp_path, stage)
    runs = {name: cli(*STAGES[stage], *COMMON, *data, *LAYOUTS[name]) for name in ["batch6", *layouts]}
    for run in runs.values():
        assert_ok(run)
    ref = weights(runs["batch6"])
    for name in layouts:
        assert max_diff(weights(runs[name]), ref) < 1e-5, name


# ---------------------------------------------------------------- the counting and scaling helpers
def test_target_counts_per_format():
    from llmlab.data.formats import TARGET_COUNTS

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8], [1, 2, 3, 4], [-100, 9, -100, -100]])  # (4, 4)
    batch = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "labels": labels}
    assert TARGET_COUNTS["sft"](batch) == {"tokens": 2 + 2 + 3 + 1}  # labels[:, 1:] != -100: position 0 is no target
    assert TARGET_COUNTS["lm"](batch) == TARGET_COUNTS["sft"](batch)
    assert TARGET_COUNTS["preference"](batch) == {"pairs": 2, "tokens": 2 + 2}  # chosen rows = the first half
    assert "prompt" not in TARGET_COUNTS  # PPO builds its own mini-batches (PPOModule.token_normalizer)


def test_step_targets_groups_as_lightning_and_keeps_order():
    from torch.utils.data import DataLoader

    from llmlab.data.datamodule import ResumableSampler, StepTargets
    from llmlab.data.formats import lm_targets

    rows = [{"labels": torch.tensor([-100] * (10 - n) + list(range(n)))} for n in range(1, 11)]  # n - ... targets
    collate = lambda ex: {"labels": torch.stack([e["labels"] for e in ex])}  # noqa: E731
    def loader():  # a fresh sampler each: a second pass of one sampler is the next epoch (another order)
        return DataLoader(rows, batch_size=2, sampler=ResumableSampler(10, seed=3, length=7 * 2), collate_fn=collate)

    plain, wrapped = list(loader()), StepTargets(loader(), lm_targets, accumulate=3)
    batches = list(wrapped)
    loader = wrapped.loader
    assert len(wrapped) == len(loader) == 7 and wrapped.sampler is loader.sampler
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(plain, batches))  # same order
    counts = [lm_targets(b)["tokens"] for b in plain]
    groups = [counts[0:3], counts[3:6], counts[6:7]]  # the last optimizer step takes the remainder
    want = [sum(g) for g in groups for _ in g]
    assert [int(b["step_tokens"]) for b in batches] == want and len(set(want)) > 1


def test_step_mean_is_the_token_weighted_mean_of_the_step():
    """With a real Trainer (accumulation 3): Lightning's 1/3 of each micro-batch's step_mean adds up to
    sum / step tokens; without step counts it is the per-batch mean; DeepSpeed's extra 1/GAS is undone."""
    import lightning as L

    from llmlab.stages.common import for_backward, step_mean

    module = L.LightningModule()
    sums, counts = torch.tensor([2.0, 30.0, 7.0]), torch.tensor([1, 10, 4])
    assert float(step_mean(module, sums[1], {}, "tokens", counts[1])) == pytest.approx(3.0)  # no trainer
    module.trainer = L.Trainer(accumulate_grad_batches=3, accelerator="cpu", devices=1, logger=False)
    step = {"step_tokens": counts.sum()}
    shares = [step_mean(module, s, step, "tokens", c) for s, c in zip(sums, counts)]
    assert float(sum(shares) / 3) == pytest.approx(39.0 / 15)
    assert float(step_mean(module, sums[1], {}, "tokens", counts[1])) == pytest.approx(3.0)  # no step counts
    assert float(for_backward(module, torch.tensor(2.0))) == 2.0  # DDP / single process: Lightning's 1/3 only


# ---------------------------------------------------------------- against TRL's SFTTrainer
def test_sft_step_with_accumulation_equals_trl_sfttrainer(tmp_path):
    """One SGD step, batch 2 x accumulation 3, on the same six prompt/completion rows (TRL's own
    tokenization and collation): llmlab's SFTModule under a real Lightning Trainer with the datamodule's
    StepTargets == TRL 1.16's SFTTrainer (HF Trainer's num_items_in_batch), fp32. Without StepTargets
    (per-micro-batch means, the old behaviour) the weights end up far from TRL's."""
    import copy
    from functools import partial

    import lightning as L
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    from llmlab.data.datamodule import StepTargets
    from llmlab.data.formats import lm_targets
    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.stages.sft import SFTModule

    tok = builtin_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=160, vocab_size=len(tok), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.bos_token_id)
    init = GPT2LMHeadModel(cfg).state_dict()
    rows = [{"prompt": f"p{i}: ", "completion": _text(n, i)} for i, n in enumerate(LENGTHS)]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                     max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                     weight_decay=0.0, report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=None,
                     completion_only_loss=True, packing=False)
    trl_model = GPT2LMHeadModel(cfg)
    trl_model.load_state_dict(init)
    trainer = SFTTrainer(model=trl_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])  # (6, T); labels -100 but completion
    trainer.train()
    want = {k: v.detach().clone() for k, v in trl_model.state_dict().items()}

    examples = [{k: batch[k][i] for k in ("input_ids", "labels", "attention_mask")} for i in range(6)]
    collate = lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ex[0]}  # noqa: E731

    def llmlab_step(wrap: bool) -> dict:
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(copy.deepcopy(init))
        module = SFTModule(model, tok, optimizer=partial(torch.optim.SGD, lr=1.0), eval_generation=False)
        loader = DataLoader(examples, batch_size=2, collate_fn=collate)
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=3, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=str(tmp_path))
        trainer.fit(module, train_dataloaders=StepTargets(loader, lm_targets, 3) if wrap else loader)
        return model.state_dict()

    assert max_diff(llmlab_step(wrap=True), want) < 1e-5
    assert max_diff(llmlab_step(wrap=False), want) > 1e-2
