"""Real model families: PEFT defaults without module names, QLoRA on a Llama, `model=hf`, and sft + LoRA through
the CLI on tiny random llama and qwen3_moe dirs (tests/families.py). The slow tier runs every family x
(full, lora, qlora): tests/test_family_matrix.py.
"""
from __future__ import annotations

import pytest
import torch

from llmlab.errors import ConfigError
from tests.conftest import assert_ok
from tests.families import FAMILIES


def meta_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.families import _ARCH

    overrides, _ = FAMILIES[model_type]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=512, pad_token_id=0,
                                                                     **{**_ARCH, **overrides}))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lora_needs_no_module_names_on_any_family(model_type):
    """peft=lora with target_modules=null fits every family: PEFT's table where it has the family (q_proj,v_proj;
    gpt_neox query_key_value), all-linear where it has none (phi3's fused qkv_proj, qwen3_moe)."""
    from omegaconf import OmegaConf

    from llmlab.models.peft import check_fits, import_peft, peft_config, target_modules

    cfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "bias": "none",
                            "target_modules": None, "modules_to_save": None})
    expected = {"gpt_neox": ["query_key_value"], "phi3": "all-linear", "qwen3_moe": "all-linear"}
    assert target_modules(cfg, model_type) == expected.get(model_type, ["q_proj", "v_proj"])
    model = meta_model(model_type)
    check_fits(cfg, model, model_type)
    wrapped = import_peft().get_peft_model(model, peft_config(cfg, model_type))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert adapted and "lm_head" not in adapted, adapted


def test_ia3_on_a_family_peft_does_not_know_lists_its_layers():
    from omegaconf import OmegaConf

    from llmlab.models.peft import check_fits

    cfg = OmegaConf.create({"method": "ia3", "target_modules": None, "feedforward_modules": None})
    check_fits(cfg, meta_model("qwen2"), "qwen2")  # PEFT's table
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, meta_model("phi3"), "phi3")
    message = str(err.value)
    assert "\n" not in message and "'phi3'" in message and "qkv_proj" in message and "gate_up_proj" in message


def compose(*overrides: str, tmp_path="/tmp/llmlab-test"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import llmlab.run  # noqa: F401  registers the config resolvers
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_qlora_on_llama_trains_with_packed_masks(family_dir, precision):
    """Issue 21: QLoRA on a local Llama failed inside SDPA: the 4D block-diagonal mask was built in the embedding's
    dtype (bf16, the compute dtype QLoRA holds frozen embeddings in) while fp32 norms made the queries fp32; then
    the bf16 head met fp32 hidden states. Packed rows (segment ids) with a padded row, a forward and backward."""
    pytest.importorskip("bitsandbytes")
    import contextlib

    from llmlab.data.rows import pack_examples, pad_rows
    from llmlab.losses import IGNORE_INDEX
    from llmlab.models.build import build_tokenizer
    from llmlab.stages.build import build_stage
    from llmlab.stages.common import forward_logits, mask_dtype

    cfg = compose("stage=sft", "model=hf", f"model.pretrained={family_dir('llama')}", "peft=qlora",
                  f"precision='{precision}'")
    tok = build_tokenizer(cfg.model)
    model = build_stage(cfg, tok).model
    assert mask_dtype(model) == torch.bool  # sdpa: a boolean mask fits queries of any dtype
    ids = [tok("hear me speak")["input_ids"], tok("All: Speak, speak. First Citizen")["input_ids"]]
    rows = pack_examples([{"input_ids": i, "labels": i} for i in ids], 64) + [{"input_ids": ids[0], "labels": ids[0]}]
    batch = pad_rows(rows, tok.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        logits = forward_logits(model, batch)
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_name_follows_the_weights():
    from omegaconf import OmegaConf

    from llmlab.run import model_name_of, name_model_after_weights

    assert model_name_of("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_name_of("/models/Llama-3.2-1B/") == "Llama-3.2-1B"
    assert model_name_of("/runs/sft/hf") == "sft/hf"
    cfg = OmegaConf.create({"model": {"name": "tiny-base", "pretrained": "/models/Qwen3-0.6B"}})
    name_model_after_weights(cfg, ["stage=sft", "model.pretrained=/models/Qwen3-0.6B"])
    assert cfg.model.name == "Qwen3-0.6B"
    cfg.model.name = "mine"
    name_model_after_weights(cfg, ["model.pretrained=/models/Qwen3-0.6B", "model.name=mine"])
    assert cfg.model.name == "mine"
    assert compose("model=hf", "model.pretrained=/models/Qwen3-0.6B").model.name == "Qwen3-0.6B"
