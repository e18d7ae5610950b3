"""stage=rm: runs with and without PEFT, exports a loadable sequence classifier that scores exactly as
in validation, refuses bad settings; the default run learns (slow tier)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import FAST, assert_ok

TINY = ["stage=rm", "model=tiny", *FAST]


def _val_pairs(n_val: int = 32):
    """The validation batch the run scored (built-in data, same seed) with the run's own tokenizer."""
    from llmlab.data import builtin
    from llmlab.data.formats import PreferenceFormat
    from llmlab.data.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    fmt = PreferenceFormat(tok, block_size=128, prompt_template="Question: {prompt}\n\nAnswer: ")
    return fmt.collate(fmt.build(builtin.preference_pairs(n_val, split="validation", seed=0), "validation"))


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_rm_runs_and_export_scores_as_in_validation(cli, peft):
    from transformers import AutoModelForSequenceClassification

    from llmlab.losses import pairwise_accuracy
    from llmlab.stages.reward import sequence_scores, split_pairs

    run = cli(*TINY, f"peft={peft}")
    assert_ok(run)
    s = run.summary
    assert s["stage"] == "rm" and s["global_step"] == 6
    for key in ("val_accuracy", "val_accuracy_first", "val_accuracy_last", "val_margin_last", "train_loss_last"):
        assert isinstance(s.get(key), float) and math.isfinite(s[key]), (key, s.get(key))
    assert 0.0 <= s["val_accuracy"] <= 1.0
    # full fine-tuning trains every weight; LoRA trains the adapters and the score head only
    full = {"none": True, "lora": False}[peft]
    if full:
        assert s["trainable_params"] == s["total_params"] > 0, s
    else:
        assert 0 < s["trainable_params"] < s["total_params"] / 2, s
    model = AutoModelForSequenceClassification.from_pretrained(run.dir / "hf").eval()
    assert model.config.num_labels == 1
    batch = _val_pairs()
    with torch.no_grad():
        chosen, rejected = split_pairs(sequence_scores(model, batch))
    assert torch.isfinite(chosen).all() and chosen.shape == (32,)
    # the exported model ranks the held-out pairs exactly as the last validation did
    assert float(pairwise_accuracy(chosen, rejected)) == pytest.approx(s["val_accuracy"], abs=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(s["val_margin_last"], abs=1e-4)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_rm_encoder_base(cli, tmp_path):
    """Any base: an encoder (DeBERTa-v2 architecture, tiny) trains as a reward model too."""
    from transformers import AutoModelForSequenceClassification

    run = cli("stage=rm", "model=tiny", *FAST[:-3], "model.config.model_type=deberta-v2",
              "+model.config.hidden_size=32", "+model.config.num_hidden_layers=2",
              "+model.config.num_attention_heads=2", "+model.config.intermediate_size=64",
              "+model.config.max_position_embeddings=256", "+model.config.relative_attention=true",
              "+model.config.position_biased_input=false", "+model.config.pos_att_type=[p2c,c2p]",
              "~model.config.n_layer", "~model.config.n_embd", "~model.config.n_head", "~model.config.n_positions",
              "~model.config.resid_pdrop", "~model.config.embd_pdrop", "~model.config.attn_pdrop")
    assert_ok(run)
    s = run.summary
    assert s["global_step"] == 6 and 0.0 <= s["val_accuracy"] <= 1.0
    assert math.isfinite(s["train_loss_first"]) and math.isfinite(s["train_loss_last"])
    model = AutoModelForSequenceClassification.from_pretrained(run.dir / "hf")
    assert type(model).__name__ == "DebertaV2ForSequenceClassification"


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_rm_refuses_data_without_pairs(cli, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "reverse abc", "response": "cba"}\n' * 20)
    run = cli("stage=rm", "model=tiny", "data=text", "data.block_size=128", f"data.train_files={data}")
    assert run.returncode == 2
    assert "chosen" in run.stderr and "data.chosen_field" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_default_rm_learns(cli):
    """Issue target: held-out pairwise accuracy >= 0.8 with the defaults (SFT'd tiny base, built-in data).
    Measured over 5 seeds at one thread and the default seed at two, with this machine's kernels and those of
    an AMD without AVX-512 and an Intel with AVX-512 (conf/stage/rm.yaml): 0.835-0.985, the worst ~1.4 standard
    errors above the target (200 held-out pairs: ~0.025 each); the default a user runs here: 0.86. One thread:
    see test_dpo."""
    run = cli("stage=rm", "trainer.enable_progress_bar=false", env={"OMP_NUM_THREADS": "1"})
    assert_ok(run)
    assert run.summary["val_accuracy"] >= 0.8, run.summary


def test_rm_loss_equals_trl_reward_trainer(tmp_path):
    import copy

    """The rm stage's loss is TRL 1.16's RewardTrainer loss on the same model and tokens: TRL's own
    collated batch (chosen rows, then rejected) scored in training mode by both, so dropout matters: both
    turn it off by default (disable_dropout), with it on the two forward passes would not agree."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.stages.reward import RewardModule

    tok = builtin_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), num_labels=1,
                                  pad_token_id=tok.pad_token_id, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = AutoModelForSequenceClassification.from_config(config)
    ours = copy.deepcopy(model)  # dropout 0.3 on: TRL turns off its own copy's, RewardModule this one's
    rows = [{"chosen": f"Question: p{i}\n\nAnswer: " + "abcdefgh"[: 1 + i] * (i + 1),
             "rejected": f"Question: p{i}\n\nAnswer: " + "ba" * (i + 1)} for i in range(6)]
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                        per_device_train_batch_size=6, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))  # (12, T): chosen rows, then rejected
    trainer.model.train()
    torch.manual_seed(1)
    trl_loss = float(trainer.compute_loss(trainer.model, dict(inputs)))

    module = RewardModule(ours, tok, optimizer=None)
    batch = {"input_ids": inputs["input_ids"], "segment_ids": torch.where(inputs["attention_mask"] == 1, 0, -1)}
    module.model.train()
    torch.manual_seed(2)  # other dropout draws would give other numbers, were dropout on
    loss = float(module._step(batch)[0])
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert all(m.p == 0.0 for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
