"""Built-in data, formats and the resumable sampler."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from llmlab.data import builtin
from llmlab.data.datamodule import LLMDataModule, ResumableSampler
from llmlab.data.tokenizer import builtin_tokenizer
from llmlab.losses import IGNORE_INDEX
from tests.conftest import CONF


def test_builtin_is_deterministic_and_held_out_is_disjoint():
    assert builtin.sft_examples(50, "train") == builtin.sft_examples(50, "train")
    train = {r["prompt"].split()[1] for r in builtin.sft_examples(2000, "train")}
    val = {r["prompt"].split()[1] for r in builtin.sft_examples(200, "validation")}
    assert train and val and not train & val
    corpus = " ".join(d["text"] for d in builtin.pretrain_documents(300, "train"))
    assert not any(f" {x} " in corpus for x in list(val)[:50])  # held-out strings never in pretraining text


def test_every_shape_is_checkable():
    for pair in builtin.preference_pairs(100):
        task, x = pair["prompt"].split()
        assert pair["chosen"] == builtin.TASKS[task](x) != pair["rejected"]
    for p in builtin.ppo_prompts(20):
        assert builtin.rule_reward(p["answer"], p["answer"]) == 1.0
        assert builtin.rule_reward(p["answer"][::-1] + "x", p["answer"]) < 1.0


def _data_cfg(**kw):
    cfg = OmegaConf.load(CONF / "data" / "builtin.yaml")
    cfg.n_train, cfg.n_val = 40, 8
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_sft_loss_mask_excludes_prompt_and_includes_eos():
    tok = builtin_tokenizer()
    dm = LLMDataModule(_data_cfg(), "sft", tok)
    dm.setup()
    ex = dm.train_set[0]
    ids, labels = ex["input_ids"], ex["labels"]
    prompt_len = ex["prompt_length"]
    assert tok.decode(ids[:prompt_len]).startswith("Question: ") and tok.decode(ids[:prompt_len]).endswith("Answer: ")
    assert all(l == IGNORE_INDEX for l in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]  # every response token is a target ...
    assert labels[-1] == tok.eos_token_id  # ... and so is the closing EOS
    assert tok.decode(labels[prompt_len:-1]) == ex["answer"]


def test_sft_packing_keeps_examples_separate():
    tok = builtin_tokenizer()
    dm = LLMDataModule(_data_cfg(pack_examples=True), "sft", tok)
    dm.setup()
    row = dm.train_set[0]
    assert max(row["segment_ids"]) >= 1 and len(row["input_ids"]) <= dm.cfg.block_size
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == max(row["segment_ids"]) + 1


def test_sampler_shards_without_duplicates_and_resumes():
    ranks = [list(ResumableSampler(10, seed=3, rank=r, world_size=2, length=5)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    full = list(ResumableSampler(10, seed=3, length=12))  # crosses into a second epoch
    assert sorted(full[:10]) == list(range(10))  # an epoch visits every sample once
    resumed = list(ResumableSampler(10, seed=3, start=4, length=8))
    assert resumed == full[4:12]
