"""PEFT: LoRA freezes the base and merges exactly, QLoRA trains on a 4-bit base on CPU, and every method
x {pretrain, sft} trains its adapter; checks refuse what cannot work, before weights load.

Models: the tiny GPT-2 (2 layers, 32 wide, byte vocabulary) and the tiny Llama, fp32 unless stated.
"""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from llmlab.errors import ConfigError
from tests.conftest import CONF

TINY = ["model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2"]
METHODS = ["lora", "dora", "qlora", "ia3", "prefix", "prompt"]


def compose_cfg(*overrides: str, tmp_path=None):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path or '/tmp/llmlab-test'}"])
    return cfg


def build(cfg):
    from llmlab.stages.build import build_stage
    from llmlab.models.build import build_tokenizer

    tokenizer = build_tokenizer(cfg.model)
    return build_stage(cfg, tokenizer), tokenizer


@pytest.fixture(scope="module")
def tiny_pretrained_dir(tmp_path_factory):
    """A tiny GPT-2 saved with save_pretrained: a local 'pretrained' base (QLoRA quantizes at load)."""
    from llmlab.models.build import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tiny_base")
    cfg = compose_cfg("model=tiny", *TINY)
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    build_model(cfg.model, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def base_overrides(method: str, base_dir) -> list[str]:
    return [f"model=tiny", "model.init=pretrained", f"model.pretrained={base_dir}", "model.tokenizer=null",
            f"peft={method}"]


def fit_steps(cfg, module, tok, tmp_path, steps: int, callbacks=()):
    """`steps` optimizer steps of the stage module on its data through a plain Lightning Trainer (no
    validation, checkpoints or logger); returns the Trainer."""
    import lightning as L

    from llmlab.stages.build import stage_class
    from llmlab.data.datamodule import LLMDataModule

    dm = LLMDataModule(cfg.data, stage_class(cfg.stage).data_format, tok, seed=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer


def random_batch(vocab: int = 256, B: int = 4, T: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(B, T, dtype=torch.long)}


def train_steps(model, batch, steps: int = 5, lr: float = 1e-2) -> list[float]:
    from llmlab.losses import causal_lm_loss
    from llmlab.stages.common import forward_logits

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = causal_lm_loss(forward_logits(model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_lora_trains_adapters_only_and_merges_exactly(model, tmp_path):
    from peft import PeftModel

    from llmlab.models.export import merged_model

    extra = TINY if model == "tiny" else []
    cfg = compose_cfg(f"model={model}", *extra, "peft=lora", "peft.dropout=0.0")
    torch.manual_seed(0)
    module, tok = build(cfg)
    peft_model = module.model
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    batch = random_batch()
    train_steps(peft_model, batch)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert changed == trainable  # every adapter tensor moved, no base tensor did

    peft_model.eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=batch["input_ids"]).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merged_model(peft_model, tmp_path / "adapter")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"]).logits
    # merging folds (alpha/r) B A into W: equal up to fp32 rounding of one extra matmul
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)

    # adapter-only save and reload on a fresh base gives the same logits
    torch.manual_seed(0)
    fresh_base, _ = build(compose_cfg(f"model={model}", *extra, "peft=none"))
    reloaded = PeftModel.from_pretrained(fresh_base.model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, adapter_logits)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]


def test_opt13b_lora_counts_match_the_course():
    """model=opt1.3b peft=lora (r=16, q_proj+v_proj), init=scratch on the meta device: exact counts."""
    from llmlab.models.build import count_params

    cfg = compose_cfg("model=opt1.3b", "model.init=scratch", "peft=lora", "dry_run=true")
    from llmlab.stages.build import build_stage

    module = build_stage(cfg, None)
    assert count_params(module.model) == (1_318_903_808, 3_145_728)


def test_default_target_modules_per_architecture():
    from llmlab.models.peft import target_modules

    cfg = compose_cfg("peft=lora").peft
    assert target_modules(cfg, "gpt2") == ["c_attn"]
    assert target_modules(cfg, "opt") == ["q_proj", "v_proj"]
    assert target_modules(cfg, "llama") == ["q_proj", "v_proj"]


def test_reward_head_stays_trainable_under_lora():
    cfg = compose_cfg("model=tiny", *TINY, "peft=lora", "+stage.head=sequence_classification")
    from llmlab.models.build import build_model, build_tokenizer
    from llmlab.models.peft import apply_peft

    tok = build_tokenizer(cfg.model)
    model = apply_peft(build_model(cfg.model, tok, head="sequence_classification"), cfg.peft,
                       head="sequence_classification")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert model.peft_config["default"].task_type == "SEQ_CLS"


# ---------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes 4-bit on CPU)
# ---------------------------------------------------------------------------------------------------


def test_qlora_trains_on_cpu_with_4bit_base(tiny_pretrained_dir):
    pytest.importorskip("bitsandbytes")
    cfg = compose_cfg(*base_overrides("qlora", tiny_pretrained_dir), "peft.dropout=0.0")
    torch.manual_seed(0)
    module, tok = build(cfg)
    model = module.model
    four_bit = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    # every frozen linear weight of the blocks is NF4 (2 layers x c_attn, c_proj, c_fc, mlp.c_proj)
    assert len(four_bit) == 8 and all(not p.requires_grad for n, p in model.named_parameters() if n in four_bit)
    assert model.get_base_model().is_loaded_in_4bit
    qs = dict(model.named_parameters())[four_bit[0]].quant_state
    assert qs.quant_type == "nf4" and qs.nested  # NF4 with double quantization
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "compute_dtype")]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)  # bf16 compute
    losses = train_steps(model, random_batch(), steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------------
# every method x {pretrain, sft}: a few Lightning steps through the real stage modules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_in_stage(method, stage, tiny_pretrained_dir, tmp_path):
    import lightning as L

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    overrides = [*base_overrides(method, tiny_pretrained_dir), f"stage={stage}", "data.n_train=64", "data.n_val=8",
                 "data.batch_size=4", "data.block_size=64", "stage.module.optimizer.lr=1e-2"]
    if stage == "pretrain" and method in ("prefix", "prompt"):
        overrides.append("data.packing=concat")  # virtual tokens need 2-D masks (checks.py says so)
    if stage == "sft":
        overrides.append("stage.module.eval_generation=false")
    cfg = compose_cfg(*overrides, tmp_path=tmp_path)
    from llmlab.checks import entry as checks

    checks.check_config(cfg)
    L.seed_everything(0)
    module, tok = build(cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert before, "no trainable parameters"
    assert frozen, "no frozen parameters: the method must leave the base frozen"
    trainer = fit_steps(cfg, module, tok, tmp_path, steps=3)
    params = dict(module.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(params[n].detach(), p)]
    assert unchanged == [], f"{method}/{stage}: trainable tensors that did not move: {unchanged}"
    # every frozen base tensor (4-bit packed ones included) is bit-identical after training
    frozen_moved = [n for n, p in frozen.items() if not torch.equal(params[n].detach(), p)]
    assert frozen_moved == [], f"{method}/{stage}: frozen tensors that moved: {frozen_moved}"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "kto", "rm"])
@pytest.mark.parametrize("method", ["none", "lora"])
def test_loaded_model_trains_in_train_mode(method, stage, tiny_pretrained_dir, tmp_path):
    """from_pretrained returns eval mode and Lightning keeps the modes it finds. Every module of the
    policy must be in train mode while it trains (else configured dropout is off and transformers skips
    gradient checkpointing); a frozen reference copy stays in eval mode. Before Stage.on_fit_start every
    stage but sft trained a loaded model in eval mode."""
    import lightning as L

    overrides = [*base_overrides(method, tiny_pretrained_dir), f"stage={stage}", "data.n_train=16", "data.n_val=4",
                 "data.batch_size=4", "data.block_size=64"]
    if stage in ("sft", "dpo", "kto"):
        overrides.append("stage.module.eval_generation=false")
    cfg = compose_cfg(*overrides, tmp_path=tmp_path)
    module, tok = build(cfg)
    assert not module.model.training or method == "lora"  # as loaded (PEFT's new layers start in train mode)
    seen = {}

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["policy_eval"] = [n for n, m in pl_module.model.named_modules() if not m.training]
            reference = getattr(pl_module, "reference", None)
            copy = getattr(reference, "copy", None)
            seen["reference_train"] = [] if copy is None else [n for n, m in copy.named_modules() if m.training]

    fit_steps(cfg, module, tok, tmp_path, steps=1, callbacks=[Modes()])
    assert seen["policy_eval"] == [], f"{stage}/{method}: modules training in eval mode: {seen['policy_eval'][:5]}"
    assert seen["reference_train"] == []
    if stage in ("dpo", "kto") and method == "none":
        assert module.reference.copy is not None  # the frozen copy was there, and checked


# ---------------------------------------------------------------------------------------------------
# checks: refused up front with the setting and the fix
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,needle", [
    (["peft=lora", "peft.target_modules=[nope_proj]"], "peft.target_modules"),
    (["model=tiny_llama", "peft=lora", "peft.target_modules=[c_attn]"], "match no linear layer"),
    (["peft=qlora"], "model.init=pretrained"),
    (["peft=prefix"], "data.packing=concat"),
    (["stage=sft", "model=tiny", "peft=prompt", "data.pack_examples=true"], "data.pack_examples=false"),
    (["stage=sft", "model=tiny", "data.prompt_template=no placeholder"], "{prompt}"),
])
def test_checks_refuse_with_the_setting_named(overrides, needle):
    from llmlab.checks import entry as checks

    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=None) as err:
        checks.check_config(cfg)
    assert needle in str(err.value)


def test_qlora_precision_and_zero3_rules(tiny_pretrained_dir):
    pytest.importorskip("bitsandbytes")
    from llmlab.checks import entry as checks

    base = base_overrides("qlora", tiny_pretrained_dir)
    checks.check_config(compose_cfg(*base, "precision=bf16-mixed"))  # the course's recipe: allowed
    with pytest.raises(ConfigError, match="compute_dtype"):
        checks.check_config(compose_cfg(*base, "precision=bf16-true", "peft.quantization.compute_dtype=float16"))
    with pytest.raises(ConfigError, match="quant_storage"):
        checks.check_config(compose_cfg(*base, "precision=bf16-true", "peft.quantization.quant_storage=float32"))
    # ZeRO-3 partitions float tensors only: an unset quant_storage becomes the precision's parameter
    # dtype automatically (llmlab.models.peft.quant_storage_for); an integer one is refused with the fix
    checks.check_config(compose_cfg(*base, "strategy=zero3"))
    with pytest.raises(ConfigError, match="quant_storage=bfloat16"):
        checks.check_config(compose_cfg(*base, "strategy=zero3", "precision=bf16-true",
                                        "peft.quantization.quant_storage=uint8"))


def test_qlora_without_bitsandbytes_is_refused(monkeypatch, tiny_pretrained_dir):
    import importlib.util

    from llmlab.checks import entry as checks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        checks.check_config(compose_cfg(*base_overrides("qlora", tiny_pretrained_dir)))


def test_packed_rows_refused_at_run_time_for_virtual_tokens():
    """Backstop behind the checks: a packed batch never reaches PEFT's mask extension."""
    from llmlab.stages.common import forward_logits

    cfg = compose_cfg("model=tiny", *TINY, "peft=prompt")
    module, _ = build(cfg)
    batch = random_batch(B=1, T=8)
    batch["segment_ids"] = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="pack_examples=false"):
        forward_logits(module.model, batch)
    batch["segment_ids"] = torch.tensor([[0, 0, 0, 0, 0, 0, -1, -1]])  # one example + padding: fine
    assert forward_logits(module.model, batch).shape == (1, 8, 259)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_qlora_reports_its_weights_not_packed_storage(tiny_pretrained_dir, tmp_path):
    """summary.json's total_params is the model's weight count: a QLoRA model reports its unquantized
    model's count plus the adapters, whatever dtype packs the 4-bit weights (uint8; bf16 under ZeRO-3,
    4 weights per element), and a dry run on the meta device reports the same; param_bytes is the
    storage, well under the fp32 model's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from llmlab.models.build import count_params, param_bytes
    from tests.conftest import run_cli

    plain = AutoModelForCausalLM.from_pretrained(tiny_pretrained_dir)
    n_plain, fp32_bytes = sum(p.numel() for p in plain.parameters()), param_bytes(plain)
    assert fp32_bytes == 4 * n_plain

    module, _ = build(compose_cfg(*base_overrides("qlora", tiny_pretrained_dir)))  # uint8 storage
    total, trainable = count_params(module.model)
    lora = {n: p.numel() for n, p in module.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and trainable == sum(lora.values())
    assert total == n_plain + trainable
    assert param_bytes(module.model) < 0.75 * fp32_bytes

    real = run_cli(tmp_path / "zero3", *base_overrides("qlora", tiny_pretrained_dir), "strategy=zero3",
                   "precision=bf16-true", "trainer.devices=2", "dry_run=true")
    assert real.returncode == 0, real.stderr[-3000:]
    assert real.summary["total_params"] == total and real.summary["trainable_params"] == trainable
    assert 0 < real.summary["param_bytes"] < 0.75 * fp32_bytes
    # dry run of the architecture (meta device, nothing quantized): the same counts, and the bytes
    # the real run holds, estimated (llmlab/distributed/memory.py: NF4 + constants; embeddings in bf16)
    from llmlab.stages.build import build_stage
    from llmlab.train import _param_bytes

    meta_cfg = compose_cfg("model=tiny", *TINY, "peft=qlora", "dry_run=true")
    from llmlab.models.build import build_tokenizer

    meta = build_stage(meta_cfg, build_tokenizer(meta_cfg.model))
    assert next(meta.model.parameters()).is_meta
    assert count_params(meta.model) == (total, trainable)
    assert 0 < _param_bytes(meta_cfg, meta.model) < 0.75 * fp32_bytes
