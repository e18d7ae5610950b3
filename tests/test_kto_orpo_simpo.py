"""The reference-free and unpaired preference family: stage=kto, stage=orpo, stage=simpo.

Hand-worked loss values; equality with TRL 1.16 on the same tokens and tiny model (KTOTrainer end to
end; ORPOTrainer / CPOTrainer(loss_type="simpo") through their own forward + loss methods on the same
batch); the unpaired data format; no reference built for reference-free losses; CLI runs (slow)."""
from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import FAST, assert_ok
from tests.test_dpo import dpo_module, pref_batch, tiny_lm


# ---------------------------------------------------------------------------------------- hand-worked
def test_simpo_hand_worked():
    """beta 2, gamma 0.5, mean log-probs -1 (chosen) and -2 (rejected): z = 2(-1) - 2(-2) - 0.5 = 1.5."""
    from llmlab.losses import SimPOLoss

    out = SimPOLoss(beta=2.0, gamma=0.5)(torch.tensor([-1.0]), torch.tensor([-2.0]))
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)  # -log sigmoid(1.5)
    assert out.chosen_rewards.tolist() == [-2.0] and out.rejected_rewards.tolist() == [-4.0]
    smooth = SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.2)(torch.tensor([-1.0]), torch.tensor([-2.0]))
    assert float(smooth.loss) == pytest.approx(0.8 * math.log1p(math.exp(-1.5)) + 0.2 * math.log1p(math.exp(1.5)))


def test_orpo_hand_worked():
    """p_c = 0.5 (odds 1, log odds 0), p_r = 0.2 (odds 1/4): the term is -beta log sigmoid(log 4) = beta log(5/4)."""
    from llmlab.losses import ORPOLoss
    from llmlab.losses.reference_free import log1mexp

    out = ORPOLoss(beta=0.1)(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]))
    assert float(out.loss) == pytest.approx(0.1 * math.log(1.25), rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.0], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1 * math.log(4)], rel=1e-5)
    x = torch.tensor([-2.0, -0.7, -0.69, -1e-3], dtype=torch.float64)  # both branches, float64 naive formula
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-9, atol=0)
    assert float(log1mexp(torch.tensor([-30.0]))) == pytest.approx(-math.exp(-30), rel=1e-6)  # naive: 0 in float32
    assert float(log1mexp(torch.tensor([-1e-7]))) == pytest.approx(math.log(1e-7), rel=1e-4)  # naive: -inf


def test_kto_hand_worked():
    """beta 1; r = log pi - log ref = [1, -1]; KL pairs give z0 = mean(-2 - -3) = 1. Desirable: 1 - sigmoid(1 - 1)
    = 0.5, x weight 2; undesirable: 1 - sigmoid(1 - (-1)) = 1 - sigmoid(2). A negative KL estimate is clamped to 0."""
    from llmlab.losses import KTOLoss

    loss = KTOLoss(beta=1.0, desirable_weight=2.0, undesirable_weight=1.0)
    labels = torch.tensor([True, False])
    out = loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels, torch.full((2,), -2.0),
               torch.full((2,), -3.0))
    assert float(out.kl) == 1.0
    torch.testing.assert_close(out.losses, torch.tensor([1.0, 1 - 1 / (1 + math.exp(-2))]))
    assert out.rewards.tolist() == [1.0, -1.0]
    clamped = loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels, torch.full((2,), -3.0),
                   torch.full((2,), -2.0))
    assert float(clamped.kl) == 0.0
    torch.testing.assert_close(clamped.losses, torch.tensor([2 * (1 - 1 / (1 + math.exp(-1))),
                                                             1 - 1 / (1 + math.exp(-1))]))


# ---------------------------------------------------------------------------------------- no reference
def test_reference_free_losses_build_no_reference():
    from llmlab.losses import ORPOLoss, SimPOLoss

    model, tok = tiny_lm()
    for loss in (ORPOLoss(), SimPOLoss()):
        module = dpo_module(model, tok, loss=loss)
        assert module.reference is None  # no frozen copy, no second forward
        assert not any(p is not q for p, q in zip(module.parameters(), model.parameters()))
    assert dpo_module(model, tok).reference.copy is not None  # DPO keeps its copy


# ---------------------------------------------------------------------------------------- TRL equality
def _trl_pair_batch(batch):
    """llmlab's (2B, T) preference batch -> TRL ORPO/CPO's chosen_* / rejected_* tensors (same tokens)."""
    B = batch["input_ids"].shape[0] // 2
    mask = (batch["segment_ids"] >= 0).long()
    out = {}
    for name, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = batch["input_ids"][rows], mask[rows]
        out[f"{name}_labels"] = batch["labels"][rows]
    return out


def _trl_self(trainer_cls, pad_id, **attrs):
    """The attributes TRL's ORPO/CPO forward and loss methods read from `self`, on CPU with one process."""
    ns = SimpleNamespace(is_encoder_decoder=False, padding_value=pad_id, pad_token_id=pad_id, aux_loss_enabled=False,
                         accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
                         concatenated_inputs=trainer_cls.concatenated_inputs,
                         get_batch_logps=trainer_cls.get_batch_logps, **attrs)
    ns.concatenated_forward = partial(trainer_cls.concatenated_forward, ns)
    return ns


def test_orpo_equals_trl_odds_ratio_term(tmp_path):
    """On the same tiny model and tokens (answers of 2-7 tokens, so length normalisation matters), llmlab's ORPO
    odds-ratio term and rewards equal TRL 1.16's ORPOTrainer. Finding: TRL's NLL term covers the prompt tokens
    too (`labels = input_ids where attention_mask`), llmlab's (sft_weight) only the answer + EOS, as stage=sft and
    the ORPO paper (NLL of the chosen response given x); so the totals differ by exactly that NLL."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from llmlab.losses import ORPOLoss, causal_lm_loss_sum

    model, tok = tiny_lm(0)
    model.eval()  # no dropout on either side (llmlab's module also sets it to 0; TRL's trainers would)
    _, _, batch = pref_batch(tok, n=8)
    ns = _trl_self(ORPOTrainer, tok.pad_token_id, beta=0.1)
    ns.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, ns)
    with torch.no_grad():
        trl_loss, metrics = ORPOTrainer.get_batch_loss_metrics(ns, model, _trl_pair_batch(batch))
        module = dpo_module(model, tok, loss=ORPOLoss(beta=0.1), sft_weight=1.0)
        loss, out, _ = module._losses(batch)
        B = 8
        nll_sum, n = causal_lm_loss_sum(module.policy_logps(batch)[1][:B], batch["labels"][:B])
    or_term = float(loss) - float(nll_sum / n)
    assert or_term == pytest.approx(float(trl_loss) - metrics["nll_loss"], rel=1e-5)
    assert float(out.chosen_rewards.mean() - out.rejected_rewards.mean()) == pytest.approx(
        0.1 * metrics["log_odds_chosen"], rel=1e-3)  # margin = beta x mean log odds ratio
    assert metrics["nll_loss"] != pytest.approx(float(nll_sum / n), rel=1e-3)  # the NLL convention differs


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_equals_trl_cpo_simpo(cpo_alpha):
    """llmlab's SimPOLoss (+ sft_weight x NLL of the chosen answers) is TRL 1.16's CPOTrainer loss_type="simpo"
    with cpo_alpha = sft_weight on the same tiny model and tokens. Note TRL's default cpo_alpha is 1.0 (an NLL
    term the SimPO paper does not have); llmlab's stage=simpo default is sft_weight=0 (pure SimPO)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    from llmlab.losses import SimPOLoss

    model, tok = tiny_lm(0)
    model.eval()  # no dropout on either side (llmlab's module also sets it to 0; TRL's trainers would)
    _, _, batch = pref_batch(tok, n=8)
    ns = _trl_self(CPOTrainer, tok.pad_token_id, beta=2.0, simpo_gamma=0.5, loss_type="simpo", alpha=0.0,
                   label_smoothing=0.0, cpo_alpha=cpo_alpha)
    ns.cpo_loss = partial(CPOTrainer.cpo_loss, ns)
    with torch.no_grad():
        trl_loss, metrics = CPOTrainer.get_batch_loss_metrics(ns, model, _trl_pair_batch(batch))
        module = dpo_module(model, tok, loss=SimPOLoss(beta=2.0, gamma=0.5), sft_weight=cpo_alpha)
        loss, out, _ = module._losses(batch)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5)
    assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-5)


def test_kto_equals_trl(tmp_path):
    """TRL 1.16's KTOTrainer._compute_loss on its own collated batch of six labelled examples (mismatched KL
    completions built by its +1 rotation), and llmlab's KTOModule on the same tokens in llmlab's layout, with a
    different tiny model as the reference (so rewards and KL are not zero): the same loss."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from llmlab.losses import KTOLoss
    from llmlab.stages.kto import KTOModule

    model, tok = tiny_lm(0)
    ref, _ = tiny_lm(1)
    ref.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    rows = [{"prompt": f"Question: p{i}\n\nAnswer: ", "completion": "abcdefgh"[: 1 + i] * (i + 1), "label": i % 3 != 1}
            for i in range(6)]
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, desirable_weight=1.3, undesirable_weight=0.7,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=6, max_length=None)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))
    T = max(inputs["input_ids"].shape[1], inputs["KL_input_ids"].shape[1])
    parts = []
    for prefix in ("", "KL_"):
        ids, att, comp = (inputs[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "completion_mask"))
        pad = T - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=tok.pad_token_id)
        att, comp = torch.nn.functional.pad(att, (0, pad)), torch.nn.functional.pad(comp, (0, pad))
        parts.append((ids, ids.masked_fill(comp == 0, -100), torch.where(att == 1, 0, -1),
                      torch.arange(T).expand_as(ids) * att))
    batch = {k: torch.cat([p[i] for p in parts]) for i, k in enumerate(("input_ids", "labels", "segment_ids",
                                                                          "position_ids"))}
    batch["desirable"] = inputs["label"].bool()
    module = KTOModule(model, tok, optimizer=partial(torch.optim.AdamW, lr=1e-3), eval_generation=False,
                       loss=KTOLoss(beta=0.1, desirable_weight=1.3, undesirable_weight=0.7),
                       reference_model=str(tmp_path / "ref"))
    with torch.no_grad():
        loss, out = module._losses(batch)
    assert float(out.kl) > 0  # the reference point is in play
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5)


# ---------------------------------------------------------------------------------------- data
def test_unpaired_format_from_pairs_and_labels():
    from llmlab.data import builtin
    from llmlab.data.unpaired import UnpairedFormat

    _, tok = tiny_lm()
    records = builtin.unpaired_examples(4, "validation")
    pairs = builtin.preference_pairs(4, "validation")
    assert len(records) == 8 and [r["label"] for r in records[:2]] == [True, False]
    assert records[0]["completion"] == pairs[0]["chosen"] and records[1]["completion"] == pairs[0]["rejected"]
    fmt = UnpairedFormat(tok, block_size=64, prompt_template="Question: {prompt}\n\nAnswer: ")
    examples = fmt.build(records, "validation")
    assert len(fmt.build(pairs, "validation")) == 8  # pairs are unpaired the same way (TRL's convention)
    convo = fmt.build([{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go"}], "train")
    assert [e["answer"] for e in convo] == ["hello", "go"]  # no prompt field: the common prefix is the prompt
    batch = fmt.collate(examples[:3])
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [True, False, True]
    # row 3 + i: prompt i with the completion of example i - 1 (mod 3)
    for i in range(3):
        want = examples[i]["prompt_ids"] + examples[(i - 1) % 3]["completion_ids"]
        assert batch["input_ids"][3 + i][: len(want)].tolist() == want
        n_completion = int((batch["labels"][3 + i] != -100).sum())
        assert n_completion == len(examples[(i - 1) % 3]["completion_ids"])


def test_unpaired_format_refuses_missing_or_bad_labels():
    from llmlab.errors import DataError
    from llmlab.data.unpaired import UnpairedFormat

    _, tok = tiny_lm()
    fmt = UnpairedFormat(tok, block_size=64)
    with pytest.raises(DataError, match="KTO data without labels"):
        fmt.build([{"prompt": "a", "completion": "b"}], "train")
    with pytest.raises(DataError, match="booleans"):
        fmt.build([{"prompt": "a", "completion": "b", "label": "yes"}], "train")


# ---------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])
def test_stage_runs(cli, stage):
    run = cli(f"stage={stage}", "model=tiny", *FAST)
    assert_ok(run)
    s = run.summary
    assert s["global_step"] == 6 and s["stage"] == stage
    for key in ("val_reward_accuracy", "val_reward_margin", "val_exact_match_first", "val_exact_match_last"):
        assert key in s, key
    if stage == "kto":
        # policy == reference: every example's loss is 1 - sigmoid(0) = 0.5, times its weight (desirable 3,
        # undesirable 1; the held-out examples come in chosen/rejected halves, so half of each)
        assert s["val_loss_first"] == pytest.approx(0.5 * (3.0 + 1.0) / 2, abs=1e-6)
        assert s["val_reward_accuracy_first"] == 0.0 and "val_kl_last" in s
