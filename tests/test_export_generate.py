"""`python -m llmlab.export` and `python -m llmlab.generate` end to end on tiny runs (real CLIs).

LoRA run: hf/ (merged) loads with AutoModelForCausalLM and matches the adapter model's logits; the
export CLI rebuilds the same from the checkpoint. QLoRA: the merged model (de-quantized base + adapter)
matches the 4-bit adapter model up to bf16 rounding. Prefix tuning: adapter only, and generate loads it.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_ok, run_cli, run_module

TINY = ["model=tiny", "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2"]
SHORT = ["stage=sft", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
         "data.n_train=128", "data.n_val=8", "data.batch_size=8", "trainer.enable_progress_bar=false",
         "stage.module.max_new_tokens=4",
         "stage.module.optimizer.lr=1e-2"]


def ids_for(tok, texts=("Question: reverse abc\n\nAnswer: ", "Question: sort dcba\n\nAnswer: ")):
    return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)


def pretrained(tiny_gpt2_dir) -> list[str]:
    return ["model=tiny", "model.init=pretrained", f"model.pretrained={tiny_gpt2_dir}", "model.tokenizer=null"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_gpt2_dir):
    run = run_cli(tmp_path_factory.mktemp("lora"), *SHORT, *pretrained(tiny_gpt2_dir), "peft=lora", "peft.dropout=0.0")
    assert_ok(run)
    return run


def adapter_model(tiny_gpt2_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), adapter_dir).eval()


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_lora_run_writes_merged_hf_and_adapter(lora_run, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = lora_run.dir
    assert (d / "hf_adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(d / "hf").eval()  # standalone: no PEFT needed
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(d / "hf")
    enc = ids_for(tok)
    with torch.no_grad():
        a = adapter_model(tiny_gpt2_dir, d / "hf_adapter")(**enc).logits
        m = merged(**enc).logits
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    assert lora_run.summary["trainable_params"] < lora_run.summary["total_params"] / 10


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_export_cli_from_checkpoint_matches_hf(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exp"
    proc = run_module("llmlab.export", str(lora_run.dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    enc = ids_for(tok)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(**enc).logits
        b = AutoModelForCausalLM.from_pretrained(lora_run.dir / "hf").eval()(**enc).logits
    torch.testing.assert_close(a, b)


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_export_cli_quantize_int8_from_a_run(lora_run, tmp_path):
    """`python -m llmlab.export RUN quantize=int8`: merged + quantized-int8, which loads with the printed call
    and computes the merged model's logits up to int8 rounding (tests/test_quantize.py: exact match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.models.quantize import load_quantized

    out = tmp_path / "exp"
    proc = run_module("llmlab.export", str(lora_run.dir), "--out", str(out), "quantize=int8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"load_quantized('{out / 'quantized-int8'}')" in proc.stdout
    enc = ids_for(AutoTokenizer.from_pretrained(out / "quantized-int8"))
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(**enc).logits
        q = load_quantized(out / "quantized-int8")(**enc).logits
    assert (q - m).abs().max() < 0.05 * m.abs().max()


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_export_cli_merges_an_adapter_directory(lora_run, tiny_gpt2_dir, tmp_path):
    proc = run_module("llmlab.export", str(lora_run.dir / "hf_adapter"), "--out", str(tmp_path / "m"), "--base", str(tiny_gpt2_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m" / "merged" / "model.safetensors").is_file()


def _generate(path, *settings):
    proc = run_module("llmlab.generate", str(path), *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_generate_cli_decoding_controls(lora_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("reverse abc\nsort dcba\ncopy hhg\n")
    greedy = _generate(lora_run.dir, f"prompts_file={prompts}", "max_new_tokens=6")
    assert [r["prompt"] for r in greedy] == ["reverse abc", "sort dcba", "copy hhg"]
    again = _generate(lora_run.dir, f"prompts_file={prompts}", "max_new_tokens=6", "batch_size=1")
    assert [r["generated"] for r in again] == [r["generated"] for r in greedy]  # greedy: batching-invariant
    sampled = [_generate(lora_run.dir, "prompt=reverse abc", "do_sample=true", "temperature=1.5", "top_k=20",
                         "top_p=0.9", "seed=7", "max_new_tokens=8")[0]["generated"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same sample
    beam = _generate(lora_run.dir, "prompt=reverse abc", "num_beams=3", "repetition_penalty=1.3",
                     "max_new_tokens=6", f"out={tmp_path / 'out.jsonl'}")
    assert len(beam) == 1 and (tmp_path / "out.jsonl").read_text().count("\n") == 1


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_generate_cli_stop_sequence_cuts_the_text():
    """On the pretrained tiny base (which continues prose like "the reverse of abc is cba. ..."), a stop
    sequence ends the text before it; without it generation runs on past the sentence."""
    from llmlab.models.bases import ensure_base

    base = ensure_base("tiny-pretrained")
    common = ["prompt=the reverse of abc is", "template=none", "max_new_tokens=16"]
    raw = _generate(base, *common)[0]["generated"]
    assert "." in raw and not raw.startswith("."), raw
    cut = _generate(base, *common, 'stop=["."]')[0]["generated"]
    assert cut == raw[: raw.index(".")]


def test_generate_cli_errors_are_clear(lora_run):
    proc = run_module("llmlab.generate", str(lora_run.dir), "temprature=0.5", "prompt=x")
    assert proc.returncode != 0 and "unknown setting 'temprature'" in proc.stderr
    proc = run_module("llmlab.generate", str(lora_run.dir))
    assert proc.returncode != 0 and "prompt=TEXT" in proc.stderr


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_qlora_export_merges_into_dequantized_base(tmp_path, tiny_gpt2_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run = run_cli(tmp_path / "q", *SHORT, *pretrained(tiny_gpt2_dir), "peft=qlora", "peft.dropout=0.0",
                  "peft.gradient_checkpointing=false")
    assert_ok(run)
    merged = AutoModelForCausalLM.from_pretrained(run.dir / "hf").eval()
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    from peft import PeftModel

    from llmlab.stages.build import keep_4bit_layout

    quantized = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, quantization_config=q)
    # bitsandbytes 0.50's CPU inference re-packing (eval + no_grad, AVX512-BF16 CPUs) fails on layers
    # narrower than its 64-value block ("shape '[96, 0]' is invalid"): the tiny model's are 32 wide.
    keep_4bit_layout(quantized)
    trained = PeftModel.from_pretrained(quantized, run.dir / "hf_adapter").eval()
    enc = ids_for(AutoTokenizer.from_pretrained(run.dir / "hf"))
    with torch.no_grad():
        a = trained(**enc).logits.float()
        m = merged(**enc).logits.float()
    # same weights (NF4 de-quantized + LoRA delta); both compute in bf16: equal to bf16 rounding
    assert (a - m).abs().max() < 0.05 * a.abs().max()


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_prefix_run_exports_adapter_and_generate_loads_it(tmp_path, tiny_gpt2_dir):
    run = run_cli(tmp_path / "p", *SHORT, *pretrained(tiny_gpt2_dir), "peft=prefix", "peft.num_virtual_tokens=4")
    assert_ok(run)
    assert (run.dir / "hf_adapter" / "adapter_config.json").is_file() and not (run.dir / "hf").exists()
    out = _generate(run.dir, "prompt=reverse abc", "max_new_tokens=4")
    assert len(out) == 1 and isinstance(out[0]["generated"], str)


def test_cut_at_stop():
    from llmlab.evaluation.generation import cut_at_stop

    assert cut_at_stop("abc. def\n", [".", "\n"]) == "abc"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
