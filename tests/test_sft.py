"""SFT: what the loss sees (prompt masked, EOS learned), exact match, packing invariance, a short run
through the CLI, and the default run's result (read from the cached tiny-sft base when present)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_ok

TINY = ["model=tiny", "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2"]


@pytest.fixture(scope="module")
def tok():
    from llmlab.data.tokenizer import builtin_tokenizer

    return builtin_tokenizer()


def test_loss_mask_excludes_prompt_and_includes_eos(tok):
    from llmlab.data.formats import SFTFormat
    from llmlab.losses import IGNORE_INDEX

    fmt = SFTFormat(tok, block_size=128, prompt_template="Question: {prompt}\n\nAnswer: ")
    (ex,) = fmt.build([{"prompt": "reverse cab", "response": "bac"}], "train")
    prompt = "Question: reverse cab\n\nAnswer: "
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # no prompt token is a target
    targets = ex["labels"][n_prompt:]
    assert tok.decode(targets[:-1]) == "bac" and targets[-1] == tok.eos_token_id  # EOS is learned
    batch = fmt.collate([ex])
    # the loss (shifted) scores exactly the response tokens and EOS: len("bac") + 1 targets
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 4


def test_exact_match_on_hand_made_predictions():
    from llmlab.evaluation.metrics import ExactMatch

    em = ExactMatch()
    assert em.compute().item() == 0.0  # nothing seen yet: 0, not NaN
    em.update(["bac", " abc \n", "ab"], ["bac", "abc", "abc"])  # hit, hit after stripping, miss
    em.update(["", "dd"], ["d", "dd"])  # miss, hit
    assert em.compute().item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        em.update(["a"], ["a", "b"])


def test_packed_sft_loss_equals_unpacked(tok):
    """Packing several examples into a row changes nothing they see: same summed loss and token count."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from llmlab.data.formats import SFTFormat
    from llmlab.losses import causal_lm_loss_sum
    from llmlab.stages.common import forward_logits

    records = [{"prompt": f"reverse {s}", "response": s[::-1]} for s in ("abc", "dcbah", "ggfa", "hhb")]
    packed = SFTFormat(tok, block_size=96, pack_examples=True)
    single = SFTFormat(tok, block_size=96, pack_examples=False)
    rows = packed.build(records, "train")
    assert len(rows) < len(records)  # several examples share a row
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2,
                                                        n_positions=128)).eval()
    with torch.no_grad():
        b1 = packed.collate(rows)
        s1, n1 = causal_lm_loss_sum(forward_logits(model, b1), b1["labels"])
        b2 = single.collate(single.build(records, "train"))
        s2, n2 = causal_lm_loss_sum(forward_logits(model, b2), b2["labels"])
    assert n1 == n2
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_short_sft_run_reports_exact_match_and_exports(cli):
    run = cli("stage=sft", *TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "data.n_train=200",
              "data.batch_size=8", "data.n_val=16", "trainer.enable_progress_bar=false", "stage.module.max_new_tokens=8",
              "data.pack_examples=true")
    assert_ok(run)
    s = run.summary
    for key in ("val_exact_match_first", "val_exact_match_last", "val_loss_first", "val_loss_last"):
        assert isinstance(s[key], float), key
    assert 0.0 <= s["val_exact_match_last"] <= 1.0
    assert s["val_loss_last"] < s["val_loss_first"]
    assert (run.dir / "hf" / "config.json").is_file() and not (run.dir / "hf_adapter").exists()


def test_sft_composes_on_the_pretrained_tiny_base_by_default():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["stage=sft"])
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(cfg.model, resolve=False)
        assert model["name"] == "tiny-base" and model["pretrained"] == "${llmlab_base:tiny-pretrained}"
        assert compose("train", overrides=["stage=sft", "model=tiny"]).model.name == "tiny"  # CLI wins
        assert compose("train", overrides=["experiment=sft_lima_opt1.3b_cpu_bf16"]).model.name == "opt1.3b"


@pytest.mark.slow  # one full default run: ~4 CPU min at one thread (bench/RESULTS.md "sft recipe")
def test_the_default_sft_command_learns_the_held_out_tasks(cli):
    """`python -m llmlab.run stage=sft` as a user types it: the default seed (1234), not the cached base's
    seed=0 (which the test below reads). At lr 3e-3 the recipe stopped on its learning cliff off the machine
    it was tuned on: this run ended at held-out EM 0.365-0.67 on an AMD EPYC. At lr 1.5e-3 it ends at 1.0
    (0.88 already at step 400, 0.97 at 600; conf/stage/sft.yaml): 0.8 leaves a margin of a cliff ~200 steps
    later. Slow: one full 800-step run (~4 CPU minutes at one thread; longer on a loaded machine)."""
    run = cli("stage=sft", "trainer.enable_progress_bar=false", timeout=1200)
    assert_ok(run)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run.dir / "config_resolved.yaml")
    assert cfg.seed == 1234 and cfg.trainer.max_steps == 800, (cfg.seed, cfg.trainer.max_steps)
    s = run.summary
    assert s["val_exact_match_first"] < 0.1, s  # the pretrained base does not answer yet
    assert s["val_exact_match_last"] > 0.8, s


@pytest.mark.slow
def test_default_sft_run_learns_the_held_out_tasks():
    """`stage=sft` (= the cached tiny-sft base's recipe): held-out exact match well above 0.5, and
    above the same model before SFT. Builds the base once if the cache lacks it (a few CPU minutes)."""
    from llmlab.models.bases import ensure_base

    hf = ensure_base("tiny-sft")
    from pathlib import Path

    summary = json.loads((Path(hf).parent / "run" / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["model"] == "tiny-base"
    assert summary["val_exact_match_last"] > 0.5, summary
    assert summary["val_exact_match_last"] > summary["val_exact_match_first"] + 0.3, summary
