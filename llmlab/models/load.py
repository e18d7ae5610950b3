"""Load what a user points a command at (`llmlab.generate`, `llmlab.eval`): a run directory (its `hf/`, or
`hf_adapter/` for prefix/prompt tuning, and its prompt template), a local HF directory (a full model, a PEFT
adapter with adapter_config.json, or an export of one of EXPORT_KINDS), or a hub name. Code shipped with a
model never runs (trust_remote_code=False)."""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.checks.hub import hub_error, hub_fixes, hub_reachable, in_hub_cache
from llmlab.errors import ConfigError
from llmlab.models.gguf import GGUF_FILE, is_gguf
from llmlab.models.peft import import_peft
from llmlab.models.quantize import MARKER, METHODS, is_quantized_dir, load_quantized

# what `python -m llmlab.export` writes, as generate and eval read it: hf/ (transformers; a torchao-quantized
# HF checkpoint is one too: its config.json says how to load it), quantized-int8/ (llmlab.models.quantize),
# gguf-<quant>/ (llama.cpp)
EXPORT_KINDS = ("hf", "int8", "gguf")


def check_export_kind(p: Path) -> None:
    """A directory that looks like an export of a kind this llmlab does not read: refused in one line before
    torch (else it would fail later as 'no config.json', or inside a loader)."""
    if (p / MARKER).is_file():
        try:
            method = json.loads((p / MARKER).read_text()).get("method")
        except (OSError, ValueError, AttributeError):
            method = None
        if method not in METHODS:
            raise ConfigError(f"MODEL={p}: an export of unknown kind ({MARKER} says method {method!r}); this llmlab "
                              f"reads exports of kinds {', '.join(EXPORT_KINDS)} (int8 methods: "
                              f"{', '.join(METHODS)}); re-export it with python -m llmlab.export")
    elif p.is_dir() and not (p / GGUF_FILE).is_file() and not (p / "config.json").is_file():
        others = sorted(f.name for f in p.glob("*.gguf"))
        if others:
            raise ConfigError(f"MODEL={p}: a directory with GGUF file(s) {', '.join(others[:3])} but no {GGUF_FILE}; "
                              f"give the file itself: MODEL={p / others[0]}")


def resolve_model(path: str) -> tuple[str, str | None]:
    """(directory or hub name to load, the run's prompt template or None)."""
    p = Path(path).expanduser()
    template = None
    if (p / "config_resolved.yaml").is_file():  # a run directory
        from omegaconf import (
            OmegaConf,  # lazy: `llmlab.generate --help` answers without it
        )

        cfg = OmegaConf.load(p / "config_resolved.yaml")
        if cfg.stage.name != "pretrain":
            template = cfg.data.get("prompt_template")
        for sub in ("hf", "hf_adapter"):
            if (p / sub / "config.json").is_file() or (p / sub / "adapter_config.json").is_file():
                return str(p / sub), template
        raise ConfigError(f"{p} is a run dir without hf/ or hf_adapter/ (did training finish?); export it first: "
                          f"python -m llmlab.export {p}")
    check_export_kind(p)
    if is_gguf(p):  # python -m llmlab.export ... format=gguf: model.gguf (or its gguf-<quant>/ directory)
        return str(p), template
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            raise ConfigError(f"MODEL={path}: a directory without config.json or adapter_config.json; give a run "
                              f"dir, an HF model directory or a PEFT adapter directory")
        if (p / "config.json").is_file():
            config = json.loads((p / "config.json").read_text() or "{}")
            if config.get("auto_map"):
                raise ConfigError(f"MODEL={path}: its config.json maps to custom code (auto_map), which llmlab does "
                                  f"not run (trust_remote_code stays off)")
        return str(p), template
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise ConfigError(f"MODEL={path}: no such directory; give a run dir, an HF model directory or a hub name")
    if not in_hub_cache(path) and not hub_reachable():
        fixes = hub_fixes(path, "MODEL")
        raise ConfigError(f"MODEL={path}: the Hugging Face hub cannot be reached and the model is not in the "
                          f"local cache; {fixes}")
    return path, template


def load(path: str, dtype=None):
    """Model (eval mode) and tokenizer; PEFT adapter directories load with their base. Never runs code
    shipped with a model (trust_remote_code=False)."""
    # lazy: `llmlab.generate --help` and its argument errors answer without transformers (~3 s)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if is_quantized_dir(p):  # python -m llmlab.export ... quantize=int8: int8 weights, fp32 activations
        if dtype is not None and dtype != torch_float32():
            raise ConfigError(f"dtype={str(dtype).removeprefix('torch.')}: {path} is an int8 quantized export, "
                              f"which computes in float32; leave dtype unset")
        model = load_quantized(p)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    try:
        if (p / "adapter_config.json").is_file():
            model = import_peft().AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise hub_error("MODEL", path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def torch_float32():
    import torch  # lazy: as transformers above

    return torch.float32
