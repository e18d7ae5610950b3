"""Generate text from a trained run or any HF model.

    python -m llmlab.generate MODEL [key=value ...]

MODEL: a GGUF export (`model.gguf` or its `gguf-<quant>/` directory: llama.cpp decodes), a run directory (uses its `hf/`, or `hf_adapter/` for prefix/prompt tuning, and its prompt
template), a local HF directory (a full model, or a PEFT adapter with adapter_config.json), or a hub
name. Settings, Hydra-style `key=value` (lists as `stop='[".", "\\n"]'`):

    prompt=TEXT              one prompt (repeat the option for several: prompt=a prompt=b)
    prompts_file=PATH        more prompts: a .txt (one per line) or .jsonl (field `prompt`: a string, or a
                             conversation [{role, content}, ...]; or field `messages`: a conversation)
    template=auto            auto: the run's data.prompt_template for a run directory, else none;
                             none; chat: each prompt as one user message through the model's chat template;
                             or a string with {prompt}, e.g. template='Question: {prompt}\\n\\nAnswer: '
                             (conversations always go through the chat template, generation prompt added)
    max_new_tokens=64
    num_beams=1              >1: beam search
    do_sample=false          true: sample with temperature / top_k / top_p
    temperature=1.0  top_k=50  top_p=1.0  repetition_penalty=1.0
    stop=[]                  stop sequences: generation ends at the first one; it is cut from the text
    seed=0                   sampling seed
    batch_size=8  dtype=null (float32 | bfloat16)  out=null (write JSONL here as well)

Greedy decoding is the default (do_sample=false, num_beams=1). Generation stops at the model's end-of-turn
/ EOS ids (generation_config's list, the tokenizer's EOS, the chat template's end of turn). Each result prints
as one JSON line {"prompt", "generated"}.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from llmlab.checks.data import check_template_text
from llmlab.data.messages import PROMPT_ENDS, messages_list
from llmlab.errors import ConfigError, DataError, fail
from llmlab.models.gguf import generate_gguf, is_gguf
from llmlab.models.load import load, resolve_model

DEFAULTS = dict(prompt=[], prompts_file=None, template="auto", max_new_tokens=64, num_beams=1, do_sample=False,
                temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, stop=[], seed=0, batch_size=8,
                dtype=None, out=None)


def _parse_value(raw: str):
    """A YAML value as on Hydra's command line: 16 -> int, false -> bool, ["."] -> list; else the text."""
    # lazy (OmegaConf, and torch, transformers, lightning below): --help and every check of what the user
    # typed answer before they load (`run`)
    from omegaconf import OmegaConf

    if not raw:
        return raw
    try:
        return OmegaConf.to_container(OmegaConf.create(f"v: {raw}"))["v"]
    except Exception:  # noqa: BLE001 - not YAML (e.g. "Answer: x"): keep it as text
        return raw


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """MODEL then key=value settings (values parsed as YAML, as Hydra does); `prompt` may repeat."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if not argv or "=" in argv[0]:
        raise ConfigError("give the model first: python -m llmlab.generate MODEL prompt=TEXT (MODEL: a run dir, "
                          "an HF model directory or a hub name; --help lists the settings)")
    model, settings = argv[0], dict(DEFAULTS)
    prompts = []
    for item in argv[1:]:
        if "=" not in item:
            raise ConfigError(f"{item!r}: settings are key=value, e.g. prompt='{item}'")
        key, raw = item.split("=", 1)
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
            hint = f"did you mean {close[0]}=?" if close else f"known: {', '.join(sorted(DEFAULTS))}"
            raise ConfigError(f"unknown setting {key!r} ({item}); {hint}")
        if key in ("prompt", "template"):  # free text: never parsed
            value = raw
        else:
            value = _parse_value(raw)
        if key == "prompt":
            if not raw.strip():
                raise ConfigError("prompt= is empty: give the text to continue, e.g. prompt='the reverse of abc is'")
            prompts.append(value)
        else:
            settings[key] = value
    settings["prompt"] = prompts
    if isinstance(settings["stop"], str):
        settings["stop"] = [settings["stop"]]
    check_settings(settings)
    return model, settings


def _int_setting(settings: dict, key: str, low: int) -> None:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: give an integer >= {low}, e.g. {key}={max(low, DEFAULTS[key])}")


def _float_setting(settings: dict, key: str, low: float, high: float, low_open: bool = False) -> None:
    value = settings[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        low < value <= high if low_open else low <= value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{key}={value!r}: give a number in {interval}, e.g. {key}={DEFAULTS[key]}")


def check_settings(settings: dict) -> None:
    """Decoding settings as HF generate needs them: checked before the model loads."""
    for key, low in (("max_new_tokens", 1), ("num_beams", 1), ("top_k", 0), ("batch_size", 1), ("seed", 0)):
        _int_setting(settings, key, low)
    _float_setting(settings, "temperature", 0.0, 100.0, low_open=True)
    _float_setting(settings, "top_p", 0.0, 1.0, low_open=True)
    _float_setting(settings, "repetition_penalty", 0.0, 100.0, low_open=True)
    for key in ("do_sample",):
        if not isinstance(settings[key], bool):
            raise ConfigError(f"{key}={settings[key]!r}: use true or false")
    if settings["dtype"] not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={settings['dtype']!r}: use float32, bfloat16 or float16 (or leave it unset)")
    if not isinstance(settings["stop"], list) or not all(isinstance(x, str) for x in settings["stop"]):
        raise ConfigError(f"stop={settings['stop']!r}: give a list of strings, e.g. stop='[\".\", \"\\n\"]'")
    out = settings.get("out")
    if out is not None and (not isinstance(out, str) or Path(out).is_dir()):
        raise ConfigError(f"out={out!r}: give a file path for the JSONL results (not a directory)")
    template = settings["template"]
    if template not in ("auto", "none", "null", "", "chat"):
        check_template_text(template, "template")


def read_prompts(settings: dict) -> list:
    """The prompts of prompt= and prompts_file= (.txt: one per line; .jsonl: field `prompt`, a string or a
    conversation, or field `messages`); a conversation is a list of messages, validated here."""
    prompts = list(settings["prompt"])
    path = settings.get("prompts_file")
    if path:
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts_file={path}: no such file; give a .txt (one prompt per line) or .jsonl "
                              f"(field `prompt`)")
        try:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"prompts_file={path}: cannot read it as text ({type(err).__name__})") from None
        if path.suffix == ".jsonl":
            for i, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ConfigError(f"prompts_file={path}: line {i} is not JSON; a .jsonl file has one object "
                                      f"per line, e.g. {{\"prompt\": \"the reverse of abc is\"}}") from None
                prompt = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
                if isinstance(prompt, list):
                    try:
                        prompts.append(messages_list(prompt, f"prompts_file={path}: line {i}", last=PROMPT_ENDS,
                                                     what="prompt"))
                    except DataError as err:
                        raise ConfigError(str(err)) from None
                    continue
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ConfigError(f"prompts_file={path}: line {i} has no non-empty string field `prompt`; "
                                      f"e.g. {{\"prompt\": \"the reverse of abc is\"}}")
                prompts.append(prompt)
        else:
            prompts += lines
        if not lines:
            raise ConfigError(f"prompts_file={path} is empty: give one prompt per line")
    if not prompts:
        raise ConfigError("no prompt: give prompt=TEXT or prompts_file=PATH")
    return prompts


def generation_kwargs(settings: dict) -> dict:
    """`generate()` keyword arguments of the decoding settings (sampling ones only when sampling)."""
    kwargs = dict(num_beams=int(settings["num_beams"]), do_sample=bool(settings["do_sample"]),
                  repetition_penalty=float(settings["repetition_penalty"]))
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
                      top_p=float(settings["top_p"]))
    return kwargs


def run(argv: list[str]) -> int:
    """Check everything the user typed (settings, prompts, model path) before torch loads, then generate."""
    path, settings = parse_args(argv)
    prompts = read_prompts(settings)
    model_path, run_template = resolve_model(path)
    template = settings["template"]
    template = run_template if template == "auto" else (None if template in ("none", "null", "") else template)
    if template is not None and template != "chat":
        setting = "template" if settings["template"] != "auto" else "the run's data.prompt_template"
        check_template_text(template, setting)
    if is_gguf(model_path):  # llama.cpp decodes; no torch
        if template == "chat" or any(isinstance(p, list) for p in prompts):
            raise ConfigError(f"{path}: a GGUF model renders no chat template here; give text prompts with "
                              f"template=none or a '{{prompt}}' template, or the model's HF directory")
        rendered = [template.format(prompt=p) if template else p for p in prompts]
        texts = generate_gguf(model_path, rendered, settings)
        return _print_results(prompts, texts, settings)
    # lazy: everything above is checked before torch loads
    import torch

    from llmlab.evaluation.generation import generate_text, render_prompts

    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    model, tokenizer = load(model_path, dtype)
    rendered = render_prompts(tokenizer, prompts, template)
    torch.manual_seed(int(settings["seed"]))
    texts = generate_text(model, tokenizer, rendered, int(settings["max_new_tokens"]),
                          batch_size=max(1, int(settings["batch_size"])), stop=list(settings["stop"]),
                          **generation_kwargs(settings))
    return _print_results(prompts, texts, settings)


def _print_results(prompts: list[str], texts: list[str], settings: dict) -> int:
    results = [{"prompt": p, "generated": g} for p, g in zip(prompts, texts)]
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    print("\n".join(lines))
    if settings.get("out"):
        Path(settings["out"]).write_text("\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`llmlab: error: ...` (one line, exit 2) for anything the user typed or pointed at."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        fail(err)


if __name__ == "__main__":
    sys.exit(main())
