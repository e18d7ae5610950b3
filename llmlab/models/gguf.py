"""GGUF export for llama.cpp and Ollama (`python -m llmlab.export RUN format=gguf quantize=f16|q8_0|q4_k_m`).

What is written (`<out>/gguf-<quant>/`): `model.gguf` (the merged model, tokenizer and chat template in its
metadata) and an Ollama `Modelfile` beside it (`ollama create NAME -f Modelfile` with no editing).

Whose code converts: llama.cpp's own `convert_hf_to_gguf.py`, from the very llama.cpp source tree that
llama-cpp-python was built from. llama-cpp-python's sdist vendors llama.cpp whole (the converter, its
`conversion/` package and `gguf-py`, the writer) but its wheel installs only the `llama_cpp` bindings, so
`scripts/setup.sh` keeps those three from the sdist it builds (`python -m llmlab.models.gguf
install-converter SDIST`) under `<venv>/share/llmlab/llama.cpp-<version>/`. Why not the `gguf` package from
PyPI with a converter copied into llmlab: the converter and gguf-py change together (architectures, metadata
keys) and must match the llama.cpp that loads the file; taking all three from one tree makes a file this
llama.cpp reads by construction, and a llama-cpp-python upgrade upgrades the converter with it. Why a
subprocess (`python -m llmlab.models.gguf _convert`): the converter puts its own gguf-py first on sys.path
(it must not meet an installed `gguf` of another version in llmlab's process), logs at INFO through the root
logger and holds the whole model; a child process keeps all of that out of the caller.

One change to the converter's behaviour, on purpose: a BPE tokenizer llama.cpp has no hash for (any
tokenizer trained here, e.g. llmlab's byte-level one) makes it stop ("BPE pre-tokenizer was not recognized").
When that tokenizer's pre-tokenizer is exactly GPT-2's byte-level one (ByteLevel, GPT-2 regex; or llmlab's
byte tokenizer, which has no merges, so splitting first changes nothing), it is written as llama.cpp's
`gpt-2` pre-tokenizer, which is the same split; anything else is still refused. The tests check that
llama.cpp then tokenizes exactly as transformers does.

Quantization types, by llama.cpp's names: `f16` and `q8_0` are written by the converter itself; `q4_k_m`
is not (the converter writes float and q8_0 only), so the model is converted to f32 first (no rounding
before the 4-bit one; the temporary file is deleted) and quantized by llama.cpp's `llama_model_quantize`
(llama-cpp-python's bindings of the library behind `llama-quantize`).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from llmlab.checkpointing.atomic import atomic_dir
from llmlab.errors import ConfigError

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPE = {"f16": "f16", "q8_0": "q8_0", "q4_k_m": "f32"}  # q4_k_m: then llama_model_quantize
EXTRA = "gguf"  # pyproject.toml: llama-cpp-python + gguf
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the version whose converter setup.sh keeps (tested)
INSTALL = (f"install it with pip install 'llmlab[{EXTRA}]' (builds llama.cpp from source: CMake and a C++ compiler; "
           f"minutes) and keep its converter: bash scripts/setup.sh does both")
GGUF_FILE, MODELFILE, INFO = "model.gguf", "Modelfile", "gguf.json"
# the model families the tests convert and run through llama.cpp (tests/test_gguf.py); others that
# llama.cpp's converter knows are converted too, unchecked by llmlab
TESTED = ("llama", "qwen2", "gpt2")


class ConversionFailed(RuntimeError):
    """llama.cpp's converter or quantizer stopped (not the user's input: exit 1, its last line shown)."""


# --------------------------------------------------------------------------------------------------
# where the converter is, and whether llama-cpp-python is here
# --------------------------------------------------------------------------------------------------

def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version (without loading its shared library), or None."""
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def converter_dir(version: str | None = None) -> Path:
    """Where llama.cpp's converter for this llama-cpp-python lives: $LLMLAB_LLAMA_CPP_CONVERTER, else
    `<sys.prefix>/share/llmlab/llama.cpp-<llama-cpp-python version>`."""
    if os.environ.get("LLMLAB_LLAMA_CPP_CONVERTER"):
        return Path(os.environ["LLMLAB_LLAMA_CPP_CONVERTER"])
    return Path(sys.prefix) / "share" / "llmlab" / f"llama.cpp-{version or llama_cpp_version()}"


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ConfigError(f"quantize={quant}: not a GGUF type llmlab writes; use one of {', '.join(QUANTS)} "
                          f"(llama.cpp's names)")
    return quant


def check_installed() -> Path:
    """The converter directory, once llama-cpp-python and the converter of its version are both here;
    ConfigError saying how to install them otherwise."""
    version = llama_cpp_version()
    if version is None:
        raise ConfigError(f"format=gguf needs llama-cpp-python, which is not installed; {INSTALL}")
    where = converter_dir(version)
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise ConfigError(f"format=gguf: llama-cpp-python {version} is installed but not llama.cpp's converter of "
                          f"that version ({where}/convert_hf_to_gguf.py); keep it from the sdist: pip download "
                          f"--no-deps --no-binary :all: llama-cpp-python=={version} -d DIR && python -m "
                          f"llmlab.models.gguf install-converter DIR/llama_cpp_python-{version}.tar.gz "
                          f"(scripts/setup.sh does this)")
    return where


def install_converter(sdist: Path, dest: Path | None = None) -> Path:
    """Keep llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from a llama-cpp-python
    sdist under `dest` (default: converter_dir of the sdist's version). Written atomically; idempotent."""
    sdist = Path(sdist)
    version = re.search(r"llama_cpp_python-([\w.]+)\.tar\.gz$", sdist.name)
    if version is None:
        raise ConfigError(f"{sdist}: not a llama-cpp-python sdist (llama_cpp_python-<version>.tar.gz)")
    dest = Path(dest) if dest else converter_dir(version.group(1))
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
    with tarfile.open(sdist) as tar, atomic_dir(dest) as tmp:
        root = f"llama_cpp_python-{version.group(1)}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(root)
                   and any(m.name[len(root):].startswith(w) for w in wanted) and (m.isfile() or m.isdir())]
        if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
            raise ConfigError(f"{sdist}: has no vendor/llama.cpp/convert_hf_to_gguf.py")
        for m in members:
            m.name = m.name[len(root):]
        tar.extractall(tmp, members=members, filter="data")
    return dest


# --------------------------------------------------------------------------------------------------
# which families the converter takes (read from its source: no torch import, before any work)
# --------------------------------------------------------------------------------------------------

def converter_architectures(where: Path) -> set[str]:
    """The HF architectures (e.g. LlamaForCausalLM) llama.cpp's converter has a text model class for:
    the keys of its `conversion.TEXT_MODEL_MAP`, read from the source."""
    tree = ast.parse((where / "conversion" / "__init__.py").read_text())
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise ConversionFailed(f"{where}/conversion/__init__.py has no TEXT_MODEL_MAP: not a converter llmlab knows")


def _causal_lm_classes() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def supported_model_types(where: Path) -> list[str]:
    """transformers model_types whose causal-LM class llama.cpp's converter converts."""
    archs = converter_architectures(where)
    return sorted(t for t, cls in _causal_lm_classes().items() if cls in archs)


def check_family(config: dict, where: Path) -> str:
    """The model's HF architecture when llama.cpp's converter takes it; ConfigError naming the ones it takes."""
    model_type = config.get("model_type")
    arch = (config.get("architectures") or [None])[0] or _causal_lm_classes().get(model_type)
    if arch in converter_architectures(where):
        return arch
    supported = supported_model_types(where)
    raise ConfigError(f"format=gguf: model_type {model_type} ({arch}) is not a family llama.cpp's converter "
                      f"(llama-cpp-python {llama_cpp_version()}) converts; it converts model_type "
                      f"{', '.join(supported)} (llmlab tests {', '.join(TESTED)})")


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------

def convert(model_dir: Path, out_dir: Path, quant: str, threads: int | None = None) -> dict:
    """Convert the HF model in `model_dir` to `out_dir/model.gguf` (+ Modelfile, gguf.json), atomically.
    Returns the summary written to gguf.json."""
    import time

    check_quant(quant)
    where = check_installed()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_family(config, where)
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        cmd = [sys.executable, "-m", "llmlab.models.gguf", "_convert", str(where), str(model_dir),
               str(Path(tmp) / GGUF_FILE), quant, str(threads or os.cpu_count() or 1)]
        # the child runs this same llmlab (a checkout first on the path, as here), whatever the cwd
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            raise ConversionFailed(f"llama.cpp's converter stopped on {model_dir} (quantize={quant}): "
                                   f"{lines[-1] if lines else f'exit {proc.returncode}'}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        text, notes = modelfile(tokenizer, config, model_dir)
        (Path(tmp) / MODELFILE).write_text(text)
        summary = {"format": "gguf", "quantize": quant, "architecture": arch, "source": str(model_dir),
                   "file": str(out_dir / GGUF_FILE), "size_bytes": (Path(tmp) / GGUF_FILE).stat().st_size,
                   "converter": f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python {llama_cpp_version()}",
                   "seconds": round(time.perf_counter() - start, 1), "modelfile": notes,
                   "ollama": f"cd {out_dir} && ollama create NAME -f {MODELFILE}"}
        (Path(tmp) / INFO).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _byte_level_gpt2(model_dir: Path) -> bool:
    """True when the tokenizer's pre-tokenizer splits text as llama.cpp's `gpt-2` pre-tokenizer does:
    ByteLevel with GPT-2's regex, or ByteLevel without it on a BPE with no merges (llmlab's byte tokenizer:
    every byte is a token whatever the split)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if pre.get("type") != "ByteLevel" or model.get("type") != "BPE" or pre.get("add_prefix_space"):
        return False
    return pre.get("use_regex", True) or not model.get("merges")


def _run_converter(where: str, model_dir: str, outfile: str, quant: str, threads: int) -> None:
    """The child process of `convert`: llama.cpp's converter (its own gguf-py first on sys.path), then
    llama_model_quantize for q4_k_m."""
    sys.path[:0] = [where, str(Path(where) / "gguf-py")]
    import convert_hf_to_gguf as converter  # noqa: E402  (the converter's own module: needs the path above)
    from conversion import base  # noqa: E402

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # no hash for this tokenizer: see the module docstring
            if _byte_level_gpt2(Path(model_dir)):
                return "gpt-2"
            raise NotImplementedError("the tokenizer's BPE pre-tokenizer is not one llama.cpp knows (no hash for "
                                      "it, and it is not GPT-2's byte-level split)") from None

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    load_hparams = base.ModelBase.load_hparams

    def load_hparams_v5(dir_model, is_mistral_format):
        # transformers 5 no longer writes GPT-2's `n_ctx` (n_positions's old alias), which the converter reads
        hparams = load_hparams(dir_model, is_mistral_format)
        if hparams.get("model_type") == "gpt2" and "n_ctx" not in hparams and "n_positions" in hparams:
            hparams["n_ctx"] = hparams["n_positions"]
        return hparams

    base.ModelBase.load_hparams = staticmethod(load_hparams_v5)
    first = outfile if quant != "q4_k_m" else outfile + ".f32"
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", first, "--outtype", CONVERTER_OUTTYPE[quant]]
    converter.main()
    if quant == "q4_k_m":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(first.encode(), outfile.encode(), params)
        os.remove(first)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize returned {rc}")


# --------------------------------------------------------------------------------------------------
# Ollama Modelfile
# --------------------------------------------------------------------------------------------------

_S, _U, _A, _U2 = "\x01SYS\x01", "\x01USR\x01", "\x01AST\x01", "\x01US2\x01"


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_parts(tokenizer) -> dict | None:
    """The model's chat template taken apart by rendering it on marker messages: what it writes before
    and after each role's content, the generation prompt, a default system block (written when the
    conversation has none, e.g. Qwen 2.5's), a leading BOS. None when the template is not of that
    role-wrapped kind (checked by re-rendering other conversations from the parts: see `render_parts`)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        user_only = _render(tokenizer, [{"role": "user", "content": _U}], False)
        user_gen = _render(tokenizer, [{"role": "user", "content": _U}], True)
        user_ast = _render(tokenizer, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}], False)
        full = _render(tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U},
                                   {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}], True)
    except Exception:  # noqa: BLE001 - a template that rejects these conversations has no simple Go form
        return None
    try:
        head, user_post = user_only.split(_U)
        user_post_gen = user_gen.split(_U)[1]
        p0, rest = full.split(_S)
        p1, rest = rest.split(_U)
        p2, rest = rest.split(_A)
        p3, p4 = rest.split(_U2)
        asst_post = user_ast.split(_A)[1]
    except ValueError:
        return None
    if not (user_post_gen.startswith(user_post) and p2.startswith(user_post) and p3.startswith(asst_post)):
        return None
    bos = tokenizer.bos_token or ""
    parts = {"bos": bos if bos and p0.startswith(bos) else "", "gen": user_post_gen[len(user_post):],
             "user_post": user_post, "asst_pre": p2[len(user_post):], "asst_post": asst_post,
             "user_pre": p3[len(asst_post):]}
    parts["sys_pre"] = p0[len(parts["bos"]):]
    if not (p1.endswith(parts["user_pre"]) and head.endswith(parts["user_pre"]) and head.startswith(parts["bos"])):
        return None
    parts["sys_post"] = p1[: len(p1) - len(parts["user_pre"])]
    parts["default_system"] = head[len(parts["bos"]): len(head) - len(parts["user_pre"])]
    checks = [[{"role": "user", "content": "hi"}],
              [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
              [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    for messages in checks:
        for gen in (True, False):
            if render_parts(parts, messages, gen) != _render(tokenizer, messages, gen):
                return None
    return parts


def render_parts(parts: dict, messages: list[dict], generation_prompt: bool) -> str:
    """What the Modelfile's TEMPLATE renders (the same structure, in Python; BOS included as the jinja writes
    it), for checking the parts against the model's own template."""
    out = parts["bos"]
    if not messages or messages[0]["role"] != "system":
        out += parts["default_system"]
    for m in messages:
        pre, post = {"system": ("sys_pre", "sys_post"), "user": ("user_pre", "user_post"),
                     "assistant": ("asst_pre", "asst_post")}[m["role"]]
        out += parts[pre] + m["content"] + parts[post]
    return out + (parts["gen"] if generation_prompt else "")


def _go(text: str) -> str:
    """Literal text inside a Go template (Ollama's TEMPLATE): `{{` would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: dict) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) that writes what `render_parts` writes, minus BOS
    (llama.cpp adds it when tokenizing, as the GGUF's add_bos_token says). Ollama always asks for the
    assistant's turn, so the generation prompt closes it. No `{{-` trim markers: they would eat the
    newlines the template's own text ends with."""
    sys_default = (f'{{{{ if or (eq (len .Messages) 0) (ne (index .Messages 0).Role "system") }}}}'
                   f'{_go(parts["default_system"])}{{{{ end }}}}') if parts["default_system"] else ""
    return (sys_default
            + '{{ range .Messages }}'
            + f'{{{{ if eq .Role "system" }}}}{_go(parts["sys_pre"])}{{{{ .Content }}}}{_go(parts["sys_post"])}'
            + f'{{{{ else if eq .Role "user" }}}}{_go(parts["user_pre"])}{{{{ .Content }}}}{_go(parts["user_post"])}'
            + f'{{{{ else if eq .Role "assistant" }}}}{_go(parts["asst_pre"])}{{{{ .Content }}}}{_go(parts["asst_post"])}'
            + '{{ end }}{{ end }}' + _go(parts["gen"]))


def _family(template: str) -> str:
    for marker, name in (("<|start_header_id|>", "Llama 3"), ("<|im_start|>", "ChatML (Qwen)"),
                         ("<start_of_turn>", "Gemma"), ("<|assistant|>", "Phi-3"), ("[INST]", "Llama 2 / Mistral")):
        if marker in template:
            return name
    return "the model's own"


def modelfile(tokenizer, config: dict, model_dir: Path) -> tuple[str, dict]:
    """The Ollama Modelfile's text and notes (what it carries, what it could not)."""
    lines = ["# Ollama Modelfile written by llmlab (python -m llmlab.export ... format=gguf)",
             f"# ollama create NAME -f {MODELFILE}   (run in this directory; FROM is relative to it)",
             f"FROM ./{GGUF_FILE}"]
    notes = {}
    parts = chat_parts(tokenizer)
    if parts is not None:
        template = go_template(parts)
        if '"""' in template:
            parts = None
    if parts is not None:
        notes["template"] = f"{_family(tokenizer.chat_template)} chat template as a Go template (checked on 6 " \
                            f"conversations against the jinja)"
        lines += [f"# TEMPLATE: {notes['template']}", f'TEMPLATE """{template}"""']
    else:
        notes["template"] = ("none: the model has no chat template, or one that is not a plain wrap of each role's "
                             "content; Ollama sends the prompt as is")
        lines.append(f"# no TEMPLATE: {notes['template']}")
    stops = []
    for token in (tokenizer.eos_token, *(t for t in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
                                        if parts and t in (parts["asst_post"] + parts["user_post"]))):
        if token and token not in stops:
            stops.append(token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    context = config.get("max_position_embeddings") or config.get("n_positions") or config.get("n_ctx")
    if context:  # Ollama's default context can exceed a small model's positions
        lines.append(f"PARAMETER num_ctx {min(int(context), 8192)}")
    gen = model_dir / "generation_config.json"
    gen = json.loads(gen.read_text()) if gen.is_file() else {}
    if gen.get("do_sample"):
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                          ("repetition_penalty", "repeat_penalty")):
            if gen.get(key) is not None:
                lines.append(f"PARAMETER {name} {gen[key]}")
    else:  # the model's generation_config decodes greedily: so does Ollama with this
        lines.append("PARAMETER temperature 0")
    notes["stop"] = stops
    return "\n".join(lines) + "\n", notes


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE and PARAMETER entries of a Modelfile (the subset llmlab writes), for tests and checks."""
    out = {"PARAMETER": []}
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if template:
        out["TEMPLATE"] = template.group(1)
    for line in text.splitlines():
        if line.startswith("FROM "):
            out["FROM"] = line[5:].strip()
        elif line.startswith("PARAMETER "):
            key, _, value = line[10:].partition(" ")
            out["PARAMETER"].append((key, value.strip().strip('"')))
    return out


# --------------------------------------------------------------------------------------------------
# loading a GGUF with llama.cpp
# --------------------------------------------------------------------------------------------------

def is_gguf(path) -> bool:
    path = Path(path)
    return path.suffix == ".gguf" and path.is_file() or (path / GGUF_FILE).is_file()


def load_gguf(path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False, **llama_kwargs):
    """llama.cpp's model (llama_cpp.Llama) for a .gguf file or a gguf-<quant>/ directory; `logits_all`: keep every
    position's logits (scoring), `llama_kwargs`: other llama_cpp.Llama settings (n_batch, ...)."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"a GGUF model needs llama-cpp-python, which is not installed; {INSTALL}") from None
    path = Path(path)
    path = path / GGUF_FILE if path.is_dir() else path
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                               logits_all=logits_all, **llama_kwargs)
    except ValueError as err:  # llama-cpp-python: "Failed to load model from file" (truncated, damaged, not GGUF)
        raise ConfigError(f"{path}: llama.cpp cannot load this GGUF file ({err}); it is truncated, damaged or not "
                          f"a GGUF model: export it again (python -m llmlab.export RUN format=gguf)") from None


def greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """llama.cpp's greedy continuation of token ids: the argmax of its own logits at each step (read from the
    context: without logits_all, llama_cpp.Llama keeps no scores); `stop_at_eos` ends at an end-of-generation
    token (EOS, EOT: llama.cpp's `llama_vocab_is_eog`), as transformers' generate does."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(list(prompt_ids))
    out = []
    for _ in range(max_new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        token = int(np.argmax(logits))
        if stop_at_eos and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        if len(out) < max_new_tokens:
            llm.eval([token])
    return out


def generate_gguf(path, prompts: list[str], settings: dict) -> list[str]:
    """llmlab.generate on a GGUF export: llama.cpp decodes each prompt (tokenized as transformers does:
    no BOS added, special tokens parsed). Greedy is `greedy` (argmax of llama.cpp's logits, ending at EOS);
    sampling is llama.cpp's own sampler (temperature, top_k, top_p, repeat_penalty, seed)."""
    from llmlab.evaluation.generation import cut_at_stop

    if int(settings["num_beams"]) > 1:
        raise ConfigError(f"num_beams={settings['num_beams']}: {path} is a GGUF export; llama.cpp decodes greedily or "
                          f"by sampling here (num_beams=1)")
    if settings.get("dtype"):
        raise ConfigError(f"dtype={settings['dtype']}: {path} is a GGUF export, whose weights' type was chosen at "
                          f"export (quantize=); leave dtype unset")
    stop = [s for s in settings["stop"] if s]
    llm = load_gguf(path, n_ctx=max(512, int(settings["max_new_tokens"]) + 512))
    texts = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        if settings["do_sample"]:
            llm.reset()
            out = llm.create_completion(ids, max_tokens=int(settings["max_new_tokens"]),
                                        temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
                                        top_p=float(settings["top_p"]),
                                        repeat_penalty=float(settings["repetition_penalty"]),
                                        seed=int(settings["seed"]))
            text = out["choices"][0]["text"]
        else:
            if float(settings["repetition_penalty"]) != 1.0:
                raise ConfigError("repetition_penalty: with a GGUF export only when sampling (do_sample=true)")
            new = greedy(llm, ids, int(settings["max_new_tokens"]), stop_at_eos=True)
            text = llm.detokenize(new).decode("utf-8", errors="replace")
        texts.append(cut_at_stop(text, stop))
    return texts


def main(argv: list[str]) -> int:
    if argv[:1] == ["_convert"]:  # the child process of convert()
        where, model_dir, outfile, quant, threads = argv[1:6]
        _run_converter(where, model_dir, outfile, quant, int(threads))
        return 0
    if argv[:1] == ["install-converter"] and len(argv) == 2:
        print(f"llama.cpp converter: {install_converter(Path(argv[1]))}")
        return 0
    if argv[:1] == ["check"]:  # exit 0 when llama-cpp-python and its converter are both installed
        try:
            print(f"llama-cpp-python {llama_cpp_version()}, converter {check_installed()}")
            return 0
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 1
    print("usage: python -m llmlab.models.gguf install-converter SDIST | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
