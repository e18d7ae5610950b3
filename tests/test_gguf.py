"""GGUF export (llmlab.models.gguf, `python -m llmlab.export ... format=gguf quantize=f16|q8_0|q4_k_m`),
checked by llama.cpp itself: llama-cpp-python loads each file and its greedy tokens are compared with
transformers' on the fp32 model; no part of llama.cpp is mocked.

Models (tests/gguf_models.py): tiny Llama, Qwen2 and GPT-2 (2 layers, 64 wide) with a real byte-level BPE
tokenizer trained on tinyshakespeare, the family's real chat template, and a few dozen training steps, so
greedy choices are not near-ties (each comparison reports its smallest top-1 margin).

Fast: bad inputs through the real CLI (exit 2, one `llmlab: error:` line), all refused before any work.
Slow: round trips per family x type, q4_k_m perplexity, the chat template and the Ollama Modelfile, and one
llmlab run (LoRA) exported through the CLI.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_module

N_NEW = 32  # greedy tokens compared (the issue asks for >= 32)
# q4_k_m: llama.cpp's held-out perplexity may exceed fp32's by at most this factor. Measured 2026-12-06 on these
# tiny models: Llama 109.93 -> 110.63 (1.006x), Qwen2 see the test's output; llama.cpp's own figures for
# Q4_K_M on 7B models are +1-5%.
Q4_PPL_RATIO = 1.05
PROMPTS_N = 3
# The largest |logit difference| llama.cpp vs transformers fp32 measured on these models at a prompt's end:
# f16 ~0.002, q8_0 0.01-0.05 (its activations are quantized too). A greedy step whose top-1 margin is below
# the type's bound is a near-tie that rounding may flip on another CPU: such a prompt is left out of the
# comparison (reported), and at least MIN_COMPARED of the prompts must be compared.
NEAR_TIE = {"f16": 0.005, "q8_0": 0.03}
MIN_COMPARED = 4
GGUF_FILE_NAME = "model.gguf"
# scripts/setup.sh installs llama-cpp-python, so CI runs these; a venv without it skips them with the reason
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (scripts/setup.sh installs it)")


def prompts() -> list[str]:
    """llmlab's built-in held-out prompts, as its SFT template writes them, and three openings from the play."""
    from llmlab.data.builtin import sft_examples

    return [f"Question: {e['prompt']}\n\nAnswer: " for e in sft_examples(PROMPTS_N, split="val")] + \
           ["KING RICHARD III:\nNow is the winter of", "ROMEO:\nBut soft, what light", "First Citizen:\nBefore we proceed"]


def fail_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("llmlab: error: "), proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------------
# bad inputs, through the real CLI; each refused before any weights load
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """Model directories with a config.json only (no weights: the checks must not need them), and a run
    directory with no checkpoint, hf/ or hf_adapter/."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("gguf_bad")
    for name, kw in (("opt", dict(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)),
                     ("llama", dict(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2))):
        cfg = AutoConfig.for_model(name, **kw)
        cfg.architectures = [{"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM"}[name]]
        cfg.save_pretrained(root / name)
    run = root / "run"
    run.mkdir()
    (run / "config_resolved.yaml").write_text("model:\n  init: scratch\n  config:\n    model_type: llama\n")
    return root


BAD = {
    "unknown_format": (["{llama}", "format=onnx", "--out", "{out}"],
                       "format=onnx: unknown export format; use one of hf, gguf"),
    "unknown_type": (["{llama}", "format=gguf", "quantize=q5_x", "--out", "{out}"],
                     "quantize=q5_x: not a GGUF type llmlab writes; use one of f16, q8_0, q4_k_m"),
    "gguf_type_without_format": (["{llama}", "quantize=q8_0", "--out", "{out}"],
                                 "quantize=q8_0 is a GGUF type: add format=gguf"),
    "family": (["{opt}", "format=gguf", "quantize=q8_0", "--out", "{out}"],
               "format=gguf: model_type opt (OPTForCausalLM) is not a family llama.cpp's converter"),
    "run_without_export": (["{run}", "format=gguf"], "a run without an export: no checkpoint, hf/ or hf_adapter/"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case, config_dirs, tmp_path):
    if case == "family" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the family check reads llama.cpp's converter (scripts/setup.sh installs it)")
    args, expected = BAD[case]
    paths = {"llama": config_dirs / "llama", "opt": config_dirs / "opt", "run": config_dirs / "run", "out": tmp_path / "o"}
    proc = run_module("llmlab.export", *[a.format(**paths) for a in args])
    line = fail_line(proc)
    assert expected in line, line
    if case == "family":  # names the families it does convert
        assert "it converts model_type" in line and " llama," in line and " qwen2," in line and "gpt2" in line, line
    assert not (tmp_path / "o").exists()


def test_llama_cpp_missing_says_how_to_install(config_dirs, tmp_path):
    """With no site-packages (python -S: neither llama-cpp-python nor anything else installed) the GGUF
    checks, which need nothing but the standard library, name the extra to install."""
    env = {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([os.sys.executable, "-S", "-m", "llmlab.export", str(config_dirs / "llama"), "format=gguf",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    line = fail_line(proc)
    assert "format=gguf needs llama-cpp-python, which is not installed; install it with pip install 'llmlab[gguf]'" \
        in line, line


@needs_llama_cpp
def test_converter_missing_says_how_to_keep_it(config_dirs, tmp_path):
    proc = run_module("llmlab.export", str(config_dirs / "llama"), "format=gguf", "--out", str(tmp_path / "o"),
                      env={"LLMLAB_LLAMA_CPP_CONVERTER": str(tmp_path / "none")})
    line = fail_line(proc)
    assert "but not llama.cpp's converter of that version" in line and "install-converter" in line, line


def test_modelfile_template_from_the_chat_template(tmp_path):
    """The Modelfile of a model with llmlab's built-in tokenizer: its chat template taken apart into a Go
    TEMPLATE that renders what the jinja renders (by Go's text/template when `go` is installed), the EOS stop,
    the model's context, greedy; a template that is not a plain wrap of each role's content gets no TEMPLATE."""
    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.models.gguf import chat_parts, go_template, modelfile, parse_modelfile, render_parts

    tok = builtin_tokenizer()
    parsed = parse_modelfile(modelfile(tok, {"n_positions": 256}, tmp_path)[0])
    assert parsed["FROM"] == "./model.gguf"
    assert parsed["PARAMETER"] == [("stop", "<|endoftext|>"), ("num_ctx", "256"), ("temperature", "0")]
    assert parsed["TEMPLATE"] == go_template(chat_parts(tok))
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_parts(chat_parts(tok), messages, True) == want
        rendered = go_render(parsed["TEMPLATE"], messages)
        assert rendered in (None, want)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    assert chat_parts(tok) is None
    text, notes = modelfile(tok, {}, tmp_path)
    assert "TEMPLATE" not in parse_modelfile(text) and "# no TEMPLATE" in text


# --------------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tests.gguf_models import TEXT, build

    if not TEXT.is_file():  # the models train on it so greedy choices have margins (tests/gguf_models.py)
        pytest.skip(f"the GGUF round trips train their tiny models on {TEXT} (shared/ beside the repo, as in CI)")
    root = tmp_path_factory.mktemp("gguf_models")
    return {family: build(family, root / family) for family in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="module")
def converted(family_dirs, tmp_path_factory):
    """{(family, quant): gguf-<quant>/ directory}, converted on first use."""
    from llmlab.models.gguf import convert

    root, done = tmp_path_factory.mktemp("gguf_out"), {}

    def get(family: str, quant: str) -> Path:
        if (family, quant) not in done:
            convert(family_dirs[family], root / family / f"gguf-{quant}", quant)
            done[family, quant] = root / family / f"gguf-{quant}"
        return done[family, quant]

    return get


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation (n tokens, EOS not special) and its smallest top-1 margin."""
    import torch

    out, margin, past = [], math.inf, None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            logits, past = res.logits[0, -1], res.past_key_values
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            token = int(logits.argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out, margin


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_transformers(family, family_dirs, converted):
    """f16 and q8_0: llama.cpp's tokens for llmlab's prompts equal transformers' tokenizer's, and its greedy
    32 new tokens equal transformers' greedy on the fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.models.gguf import greedy, load_gguf

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    paths = {}
    for prompt in prompts():
        ids = tok(prompt, add_special_tokens=False).input_ids
        paths[prompt] = (ids, *hf_greedy(model, ids, N_NEW))
    for quant in ("f16", "q8_0"):
        llm = load_gguf(converted(family, quant), n_ctx=256, threads=1)
        compared = 0
        for prompt, (ids, want, margin) in paths.items():
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, (quant, prompt)
            if margin < NEAR_TIE[quant]:
                print(f"{family} {quant}: {prompt!r} left out: a near-tie on its greedy path (margin {margin:.4f})")
                continue
            got = greedy(llm, ids, N_NEW)
            assert got == want, (family, quant, prompt, margin, tok.decode(want), tok.decode(got))
            compared += 1
        llm.close()
        print(f"{family} {quant}: {compared}/{len(paths)} prompts x {N_NEW} greedy tokens equal; smallest top-1 "
              f"margins {sorted(round(m, 3) for _, _, m in paths.values())}")
        assert compared >= MIN_COMPARED, (family, quant, compared)


def perplexity_hf(model, windows) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logits = model(input_ids=x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


def perplexity_llama_cpp(path: Path, windows) -> float:
    import numpy as np

    from llmlab.models.gguf import GGUF_FILE

    import llama_cpp

    llm = llama_cpp.Llama(str(path / GGUF_FILE), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=1, n_threads_batch=1)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    llm.close()
    return math.exp(nll / n)


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q4_k_m_perplexity(family, family_dirs, converted):
    """q4_k_m (converted at f32, quantized by llama_model_quantize): llama.cpp's perplexity on held-out
    Shakespeare (the file's last 20,000 characters; training read the first 300,000) within Q4_PPL_RATIO of
    transformers' fp32; f16 through llama.cpp within 1% (the same model, so the check is a fair one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.gguf_models import TEXT

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    ids = tok(TEXT.read_text()[-20_000:], add_special_tokens=False).input_ids
    windows = [ids[i: i + 128] for i in range(0, 128 * 8, 128)]
    fp32 = perplexity_hf(AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval(), windows)
    f16 = perplexity_llama_cpp(converted(family, "f16"), windows)
    q4 = perplexity_llama_cpp(converted(family, "q4_k_m"), windows)
    print(f"{family} held-out perplexity: fp32 {fp32:.3f}, llama.cpp f16 {f16:.3f}, q4_k_m {q4:.3f} ({q4 / fp32:.3f}x)")
    assert abs(f16 / fp32 - 1) < 0.01, (fp32, f16)
    assert q4 / fp32 < Q4_PPL_RATIO, (fp32, q4)
    sizes = {q: (converted(family, q) / GGUF_FILE_NAME).stat().st_size for q in ("f16", "q4_k_m")}
    assert sizes["q4_k_m"] < sizes["f16"], sizes


CONVERSATIONS = [
    [{"role": "user", "content": "What light through yonder window breaks?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who is there?"},
     {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Long live the king!"}],
]


def go_render(template: str, messages: list[dict]) -> str | None:
    """Ollama's TEMPLATE rendered by Go's own text/template (as Ollama does, over .Messages); None without Go."""
    go = shutil.which("go")
    if go is None:
        return None
    import tempfile

    program = r'''package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
  var in struct { Template string; Messages []Message }
  json.NewDecoder(os.Stdin).Decode(&in)
  t := template.Must(template.New("t").Parse(in.Template))
  if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil { panic(err) }
}
'''
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "main.go").write_text(program)
        proc = subprocess.run([go, "run", "main.go"], cwd=d, input=json.dumps({"Template": template, "Messages": [
            {"Role": m["role"], "Content": m["content"]} for m in messages]}), capture_output=True, text=True,
            timeout=300, env={**os.environ, "GOCACHE": str(Path(d) / "cache"), "GOFLAGS": "-mod=mod"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chat_template_and_modelfile(family, family_dirs, converted):
    """The GGUF carries the model's chat template, and it renders each conversation as transformers renders
    it (through llama-cpp-python's own chat formatter, and llama.cpp's C `llama_chat_apply_template`, which
    recognizes these families' templates, except Qwen 2.5's default system message when none is given); the Ollama Modelfile beside it points at the file, stops at the
    turn's end token, and its TEMPLATE (Go) renders the same text without BOS (llama.cpp adds it)."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from llmlab.models.gguf import MODELFILE, load_gguf, parse_modelfile

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    out = converted(family, "q8_0")
    llm = load_gguf(out, n_ctx=256, threads=1)
    template = llm.metadata["tokenizer.chat_template"]
    assert llm._model.token_get_text(llm.token_eos()) == tok.eos_token  # the end-of-turn token of the template
    llm.close()
    assert template == tok.chat_template
    fmt = Jinja2ChatFormatter(template, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    parsed = parse_modelfile((out / MODELFILE).read_text())
    assert (out / parsed["FROM"]).resolve() == (out / GGUF_FILE_NAME).resolve()
    assert ("stop", {"llama": "<|eot_id|>", "qwen2": "<|im_end|>"}[family]) in parsed["PARAMETER"]
    assert ("num_ctx", "512") in parsed["PARAMETER"] and ("temperature", "0") in parsed["PARAMETER"]
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert fmt(messages=messages).prompt == want
        # llama.cpp's own C renderer (no jinja: it detects the template's family and writes that family's
        # format; it does not know Qwen 2.5's default system message, which the jinja route above writes)
        if family == "qwen2" and messages[0]["role"] != "system":
            continue
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, len(buf))
        assert n > 0 and buf.raw[:n].decode() == want.removeprefix(tok.bos_token or ""), buf.raw[:n]
        rendered = go_render(parsed["TEMPLATE"], messages)
        if rendered is not None:
            assert rendered == want.removeprefix(tok.bos_token or "")


@needs_llama_cpp
@pytest.mark.slow
def test_lora_run_to_gguf_through_the_cli(family_dirs, tmp_path):
    """A real llmlab run (SFT + LoRA, 4 steps, on the tiny Llama as its pretrained base) exported with
    `python -m llmlab.export RUN format=gguf quantize=q8_0`: the adapter is merged first (merged/ differs from
    the base), the GGUF and Modelfile sit in export/gguf-q8_0/, and `python -m llmlab.generate` on the GGUF
    (llama.cpp) answers what it answers on merged/ (transformers), greedy."""
    from safetensors.torch import load_file

    from tests.conftest import assert_ok, run_cli

    run = run_cli(tmp_path / "run", "stage=sft", "model=tiny", "model.init=pretrained",
                  f"model.pretrained={family_dirs['llama']}", "model.tokenizer=null", "peft=lora",
                  "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                  "data.n_train=64", "data.n_val=8", "data.batch_size=8", "trainer.enable_progress_bar=false",
                  "stage.module.max_new_tokens=4", "stage.module.optimizer.lr=1e-2")
    assert_ok(run)
    proc = run_module("llmlab.export", str(run.dir), "format=gguf", "quantize=q8_0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run.dir / "export"
    gguf_dir, merged = out / "gguf-q8_0", out / "merged"
    assert f"gguf: {gguf_dir / GGUF_FILE_NAME}" in proc.stdout and "ollama create NAME -f Modelfile" in proc.stdout
    assert {p.name for p in gguf_dir.iterdir()} == {GGUF_FILE_NAME, "Modelfile", "gguf.json"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    base = load_file(family_dirs["llama"] / "model.safetensors")
    trained = load_file(merged / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (trained[key] - base[key]).abs().max() > 1e-4  # LoRA's update merged in
    info = json.loads((gguf_dir / "gguf.json").read_text())
    assert info["quantize"] == "q8_0" and info["architecture"] == "LlamaForCausalLM" and info["source"] == str(merged)

    answers = {}
    for model in (gguf_dir, merged):
        proc = run_module("llmlab.generate", str(model), f"prompt={prompts()[3]}", f"prompt={prompts()[0]}",
                          "template=none", "max_new_tokens=24")
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[model.name] = [json.loads(line)["generated"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert answers["gguf-q8_0"] == answers["merged"] and all(answers["merged"]), answers
    proc = run_module("llmlab.generate", str(gguf_dir), "prompt=x", "num_beams=2")
    assert "is a GGUF export; llama.cpp decodes greedily or by sampling here" in fail_line(proc)


# --------------------------------------------------------------------------------------------------
# llmlab.eval on a GGUF export (llmlab/evaluation/llamacpp_lm.py), and every export kind through the CLIs
# --------------------------------------------------------------------------------------------------

def test_eval_gguf_without_llama_cpp_says_how_to_install(tmp_path):
    """llama-cpp-python absent (`sys.modules['llama_cpp'] = None`: Python's own marker for a module that is
    not there; find_spec and import both say so): eval on a GGUF is refused in one line before torch."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code = ("import runpy, sys; sys.modules['llama_cpp'] = None; sys.argv = ['llmlab.eval', sys.argv[1], "
            "'eval=builtin']; runpy.run_module('llmlab.eval', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([os.sys.executable, "-c", code, str(tmp_path / "m.gguf")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)
    line = fail_line(proc)
    assert "is a GGUF export, which llama.cpp evaluates: llama-cpp-python is not installed; install it with " \
           "pip install 'llmlab[gguf]'" in line, line
    assert not (tmp_path / "eval.json").exists()


@needs_llama_cpp
@pytest.mark.parametrize("setting", ["dtype=bfloat16", "autocast=bf16", "template=chat"])
def test_eval_gguf_refuses_torch_settings(setting, tmp_path):
    """Settings that mean something only to transformers are refused for a GGUF in one line, before loading."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # not a model: the checks must not read it
    line = fail_line(run_module("llmlab.eval", str(tmp_path / "m.gguf"), setting))
    assert f"{setting.split('=')[0]}=" in line and "is a GGUF export" in line, line


@pytest.mark.parametrize("module", ["llmlab.eval", "llmlab.generate"])
def test_unknown_export_kind(module, tmp_path):
    """An int8-looking export of a method this llmlab does not read, and a directory of GGUF files without
    model.gguf: one line each, naming what is read (or the file to give), from both entry points."""
    foreign = tmp_path / "int4"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "quantization.json").write_text(json.dumps({"method": "int4"}))
    loose = tmp_path / "downloaded"
    loose.mkdir()
    (loose / "tiny-q4_k_m.gguf").write_bytes(b"GGUF")
    extra = ["eval=builtin"] if module == "llmlab.eval" else ["prompt=x"]
    line = fail_line(run_module(module, str(foreign), *extra))
    assert "an export of unknown kind (quantization.json says method 'int4'); this llmlab reads exports of kinds " \
           "hf, int8, gguf (int8 methods: int8)" in line, line
    line = fail_line(run_module(module, str(loose), *extra))
    assert f"GGUF file(s) tiny-q4_k_m.gguf but no model.gguf; give the file itself: MODEL={loose}/tiny-q4_k_m.gguf" \
        in line, line


@needs_llama_cpp
@pytest.mark.parametrize("module", ["llmlab.eval", "llmlab.generate"])
def test_damaged_gguf_is_one_line(module, tmp_path):
    """A truncated or damaged .gguf (here: the magic and nothing else) is llama.cpp's refusal in one line naming
    the file and the fix, not llama-cpp-python's traceback."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(12))
    line = fail_line(run_module(module, str(tmp_path / "m.gguf"), *(["eval=builtin"] if module == "llmlab.eval"
                                                                     else ["prompt=x"])))
    assert "llama.cpp cannot load this GGUF file" in line and "m.gguf" in line and "format=gguf" in line, line


# llama.cpp f16 vs transformers fp32 on the tiny trained Llama (measured 2026-12-07, 30 documents each): the
# largest |log-likelihood difference| of a multiple-choice request (~5-15 tokens) was 0.0032, of a whole
# rolling-window document (~100 tokens) 0.015 (relative 7e-5); every greedy answer equal
LL_TOL = 0.02  # per multiple-choice request (f16 logits differ by ~0.002; a few tokens summed)
ROLLING_RTOL = 1e-3  # per document, relative
GEN_EQUAL = 0.9  # share of greedy answers that must be equal (a near-tie may flip at f16 on another CPU)


def _samples(result: dict) -> dict[str, list]:
    return {task: [s["filtered_resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
            for task, rows in result["samples"].items()}


@needs_llama_cpp
@pytest.mark.slow
def test_eval_gguf_equals_transformers(family_dirs, converted, tmp_path):
    """An independent check of the llama.cpp evaluator: the same lm-eval requests scored by llama.cpp on the
    f16 GGUF and by transformers (llmlab.eval's normal path, HFLM) on the fp32 model give the same
    log-likelihoods per request (multiple choice, rolling perplexity windows), the same greedy answers and the
    same task metrics, within the tolerances above."""
    from llmlab.evaluation.harness import evaluate, load_task_set
    from llmlab.evaluation.llamacpp_lm import LlamaCppLM
    from llmlab.models.load import load
    from tests.gguf_models import TEXT

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(TEXT.read_text()[-20_000:])  # training read the first 300,000 characters
    perplexity = load_task_set("perplexity")
    perplexity.text_file = str(held_out)
    model, tok = load(str(family_dirs["llama"]))
    gguf = LlamaCppLM(converted("llama", "f16"), threads=1)
    for task_set in (load_task_set("builtin"), perplexity):
        hf = evaluate(model, tok, task_set, limit=30, log_samples=True)
        cpp = evaluate(gguf, None, task_set, limit=30, log_samples=True)
        for task, rows in _samples(hf).items():
            theirs = _samples(cpp)[task]
            assert len(rows) == len(theirs) == 30, task
            if task == "llmlab_builtin_em":
                equal = sum(a == b for a, b in zip(rows, theirs))
                print(f"{task}: {equal}/30 greedy answers equal")
                assert equal >= GEN_EQUAL * 30, [(a, b) for a, b in zip(rows, theirs) if a != b][:3]
                continue
            worst = 0.0
            for a, b in zip(rows, theirs):
                for x, y in zip(a, b):
                    x, y = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)  # (ll, is_greedy) | ll
                    tol = LL_TOL if task == "llmlab_builtin_mc" else ROLLING_RTOL * abs(x)
                    worst = max(worst, abs(x - y))
                    assert abs(x - y) <= tol, (task, x, y)
            print(f"{task}: largest |log-likelihood difference| {worst:.4f}")
        for task, r in hf["tasks"].items():
            for name, value in r["metrics"].items():
                assert cpp["tasks"][task]["metrics"][name] == pytest.approx(value, rel=1e-3), (task, name)


@needs_llama_cpp
@pytest.mark.slow
def test_every_export_kind_through_the_clis(family_dirs, converted, tmp_path):
    """`llmlab.generate` and `llmlab.eval` take each kind `llmlab.export` writes: the fp32 HF model, the int8
    export (written here by the real CLI) and the f16 GGUF; the GGUF's built-in scores equal the HF model's."""
    src = family_dirs["llama"]
    proc = run_module("llmlab.export", str(src), "quantize=int8", "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = {"hf": src, "int8": tmp_path / "export" / "quantized-int8", "gguf": converted("llama", "f16")}
    scores = {}
    for kind, path in kinds.items():
        proc = run_module("llmlab.generate", str(path), f"prompt={prompts()[3]}", "max_new_tokens=8")
        assert proc.returncode == 0, (kind, proc.stderr[-2000:])
        generated = [json.loads(line)["generated"] for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(generated) == 1 and generated[0], (kind, proc.stdout[-1000:])
        out = tmp_path / f"eval-{kind}.json"
        proc = run_module("llmlab.eval", str(path), "eval=builtin", "limit=20", f"out={out}")
        assert proc.returncode == 0, (kind, proc.stderr[-2000:])
        scores[kind] = json.loads(out.read_text())["tasks"]
        assert set(scores[kind]) == {"llmlab_builtin_mc", "llmlab_builtin_em"}, (kind, scores[kind])
    print({k: {t: r["metrics"] for t, r in v.items()} for k, v in scores.items()})
    assert scores["gguf"]["llmlab_builtin_mc"]["metrics"] == scores["hf"]["llmlab_builtin_mc"]["metrics"]
