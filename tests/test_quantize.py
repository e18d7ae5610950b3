"""Quantized export for CPU deployment (llmlab.models.quantize, `python -m llmlab.export ... quantize=int8`).

Fast: GPT-2's Conv1D -> nn.Linear is exact; int8 layers on a tiny random GPT-2 save and load back to the
same numbers. Slow: the cached tiny SFT base exported with the real CLI loads back with the documented
call, generates through `llmlab.generate`, and keeps its held-out exact match.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_module

# Measured on the cached tiny SFT base (200 held-out items, 2026-11-24): fp32 1.00, int8 1.00, 200/200 greedy
# answers identical; on an earlier build of that base 0.96 / 0.96 with 195/200 identical. A flipped answer
# moves EM by 0.005: allow 8 of 200 items (0.04) either way.
EM_TOLERANCE = 0.04
N_HELD_OUT = 200


def tiny_gpt2(tied: bool = True):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_layer=2, n_embd=64, n_head=2, n_positions=64, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_conv1d_to_linear_is_exact():
    from llmlab.models.quantize import conv1d_to_linear

    model, ids = tiny_gpt2(), torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        names = conv1d_to_linear(model)
        after = model(ids).logits
    assert len(names) == 8 and all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)  # 4 per block
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_int8_roundtrip_and_error(tmp_path):
    """Every Linear (LM head included, untied from the fp32 embedding) becomes int8; saved and loaded it
    computes exactly what it computed in memory; vs fp32 the logits move by int8 rounding only."""
    from llmlab.models.quantize import MARKER, load_quantized, quantize_int8, save_quantized

    fp32, ids = tiny_gpt2(), torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = fp32(ids).logits
        model, info = quantize_int8(tiny_gpt2())
        mem = model(ids).logits
    assert info["lm_head_untied"] and "lm_head" in info["quantized"] and len(info["quantized"]) == 9
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.get_input_embeddings().weight.dtype == torch.float32
    save_quantized(model, info, None, tmp_path / "q")
    summary = json.loads((tmp_path / "q" / MARKER).read_text())
    assert summary["load"].startswith("from llmlab.models.quantize import load_quantized")
    back = load_quantized(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, mem, atol=0, rtol=0)
    # per-channel int8 weights + per-batch int8 activations: a few percent of the logit scale
    assert (mem - ref).abs().max() < 0.05 * ref.abs().max()


def test_refuses_what_it_cannot_quantize():
    from llmlab.errors import ConfigError
    from llmlab.models.quantize import check_method, quantize_int8

    with pytest.raises(ConfigError, match="quantize=int4: not available on CPU"):
        check_method("int4")

    class Int8Linear(torch.nn.Linear):  # stands for bitsandbytes-style Linear subclasses
        pass

    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc = Int8Linear(64, 256)
    with pytest.raises(ConfigError, match="Linear subclasses this quantizer cannot handle .*Int8Linear"):
        quantize_int8(model)


@pytest.mark.slow
def test_quantized_export_keeps_held_out_exact_match(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.models.bases import ensure_base
    from llmlab.data.builtin import sft_examples
    from llmlab.models.quantize import load_quantized
    from llmlab.evaluation.generation import greedy_answers

    base = ensure_base("tiny-sft")
    proc = run_module("llmlab.export", str(base), "quantize=int8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    qdir = tmp_path / "quantized-int8"
    assert f"load with: from llmlab.models.quantize import load_quantized; model = load_quantized('{qdir}')" in proc.stdout
    assert "iB int8 weights vs" in proc.stdout and "for the float32 export" in proc.stdout
    model = load_quantized(qdir)  # the documented call

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    items = sft_examples(N_HELD_OUT, split="val")
    prompts = [f"Question: {e['prompt']}\n\nAnswer: " for e in items]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def exact_match(m):
        with torch.no_grad():
            answers = greedy_answers(m, tok, enc.input_ids, enc.attention_mask, 16)
        return sum(a.strip() == e["response"].strip() for a, e in zip(answers, items)) / len(items), answers

    em_q, answers_q = exact_match(model)
    em_fp32, _ = exact_match(AutoModelForCausalLM.from_pretrained(base).eval())
    assert em_fp32 > 0.5, em_fp32
    assert abs(em_q - em_fp32) <= EM_TOLERANCE, (em_q, em_fp32)

    # llmlab.generate takes the quantized directory and decodes what load_quantized decodes
    proc = run_module("llmlab.generate", str(qdir), f"prompt={items[0]['prompt']}", "template=Question: {prompt}\n\nAnswer: ",
                "max_new_tokens=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["generated"].strip() == answers_q[0].strip()
    proc = run_module("llmlab.generate", str(qdir), "prompt=x", "dtype=bfloat16")
    assert proc.returncode == 2 and "int8 quantized export" in proc.stderr


@pytest.mark.slow
def test_lora_int8_trains_on_an_int8_base(tmp_path, tiny_gpt2_dir):
    """peft=lora_int8 (bitsandbytes LLM.int8 base + LoRA) trains on CPU through the real CLI: the loss falls,
    the checkpointed base is the int8 weights it loaded (unchanged), and hf/ (base de-quantized + LoRA
    merged) computes what the int8 base + adapter computes, up to int8 activation rounding."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tests.conftest import assert_ok, run_cli

    run = run_cli(tmp_path / "r", "stage=sft", "model=tiny", "model.init=pretrained",
                  f"model.pretrained={tiny_gpt2_dir}", "model.tokenizer=null", "peft=lora_int8", "peft.dropout=0.0",
                  "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                  "data.n_train=128", "data.n_val=8", "data.batch_size=8", "trainer.enable_progress_bar=false",
                  "stage.module.max_new_tokens=4", "stage.module.optimizer.lr=1e-2")
    assert_ok(run)
    s = run.summary
    assert s["peft"] == "lora_int8" and s["val_loss_last"] < s["val_loss_first"] - 0.05, s
    assert s["trainable_params"] < s["total_params"] / 10

    loaded = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    fresh = {k: v for k, v in loaded.state_dict().items() if k.endswith(".weight") and v.dtype == torch.int8}
    assert len(fresh) == 8  # 2 blocks x c_attn, attn.c_proj, c_fc, mlp.c_proj
    state = torch.load(run.dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for key, q in fresh.items():
        head, _, leaf = key.rpartition(".")
        lora_target = f"model.base_model.model.{head}.base_layer.{leaf}"  # c_attn; the others are unwrapped
        trained = state.get(lora_target, state.get(f"model.base_model.model.{key}"))
        assert trained.dtype == torch.int8 and torch.equal(trained, q), key  # frozen, still int8

    trained = PeftModel.from_pretrained(loaded, run.dir / "hf_adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run.dir / "hf").eval()
    tok = AutoTokenizer.from_pretrained(run.dir / "hf")
    enc = tok(["Question: reverse abc\n\nAnswer: "], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a, m = trained(**enc).logits, merged(**enc).logits
    assert (a - m).abs().max() < 0.05 * a.abs().max()


@pytest.mark.slow
def test_torchao_int8_checkpoint_loads_with_plain_from_pretrained(tmp_path):
    """The standard-loader route measured for issue 24 (llmlab.models.quantize's docstring: kept as the
    migration target, not the default, for its speed here): torchao int8 through TorchAoConfig saves with
    save_pretrained, a plain from_pretrained(dir) loads it still quantized and computing what was saved, and
    llmlab's loader (what generate and eval use) reads it as the HF directory it is."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.utils import TorchAOBaseTensor
    from transformers import AutoModelForCausalLM, LlamaConfig, TorchAoConfig

    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.models.load import load

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "fp32")
    builtin_tokenizer().save_pretrained(tmp_path / "fp32")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=TorchAoConfig(Int8DynamicActivationInt8WeightConfig())).eval()
    quantized.save_pretrained(tmp_path / "ao")
    builtin_tokenizer().save_pretrained(tmp_path / "ao")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ao").eval()
    ours, _ = load(str(tmp_path / "ao"))
    weight = plain.model.layers[0].mlp.up_proj.weight
    assert isinstance(weight, TorchAOBaseTensor), type(weight)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = quantized(ids).logits
        torch.testing.assert_close(plain(ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(ours(ids).logits, want, atol=0, rtol=0)
