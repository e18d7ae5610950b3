"""Generate text from a trained run or any HF model.

    python -m llmlab.generate MODEL [key=value ...]

MODEL: a run directory (uses its `hf/`, or `hf_adapter/` for prefix/prompt tuning, and its prompt
template), a local HF directory (a full model, or a PEFT adapter with adapter_config.json), or a hub
name. Settings, Hydra-style `key=value` (lists as `stop='[".", "\\n"]'`):

    prompt=TEXT              one prompt (repeat the option for several: prompt=a prompt=b)
    prompts_file=PATH        more prompts: a .txt (one per line) or .jsonl (field `prompt`)
    template=auto            auto: the run's data.prompt_template for a run directory, else none;
                             none; or a string with {prompt}, e.g. template='Question: {prompt}\\n\\nAnswer: '
    max_new_tokens=64
    num_beams=1              >1: beam search
    do_sample=false          true: sample with temperature / top_k / top_p
    temperature=1.0  top_k=50  top_p=1.0  repetition_penalty=1.0
    stop=[]                  stop sequences: generation ends at the first one; it is cut from the text
    seed=0                   sampling seed
    batch_size=8  dtype=null (float32 | bfloat16)  out=null (write JSONL here as well)

Greedy decoding is the default (do_sample=false, num_beams=1). Each result prints as one JSON line
{"prompt", "generated"}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULTS = dict(prompt=[], prompts_file=None, template="auto", max_new_tokens=64, num_beams=1, do_sample=False,
                temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, stop=[], seed=0, batch_size=8,
                dtype=None, out=None)


def _parse_value(raw: str):
    """A YAML value as on Hydra's command line: 16 -> int, false -> bool, ["."] -> list; else the text."""
    from omegaconf import OmegaConf

    if not raw:
        return raw
    try:
        return OmegaConf.to_container(OmegaConf.create(f"v: {raw}"))["v"]
    except Exception:  # noqa: BLE001 - not YAML (e.g. "Answer: x"): keep it as text
        return raw


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """MODEL then key=value settings (values parsed as YAML, as Hydra does); `prompt` may repeat."""
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        raise SystemExit(__doc__)
    model, settings = argv[0], dict(DEFAULTS)
    prompts = []
    for item in argv[1:]:
        if "=" not in item:
            raise SystemExit(f"llmlab.generate: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in DEFAULTS:
            raise SystemExit(f"llmlab.generate: unknown setting {key!r}; known: {sorted(DEFAULTS)}")
        if key in ("prompt", "template"):  # free text: never parsed
            value = raw
        else:
            value = _parse_value(raw)
        if key == "prompt":
            prompts.append(value)
        else:
            settings[key] = value
    settings["prompt"] = prompts
    if isinstance(settings["stop"], str):
        settings["stop"] = [settings["stop"]]
    return model, settings


def read_prompts(settings: dict) -> list[str]:
    prompts = list(settings["prompt"])
    path = settings.get("prompts_file")
    if path:
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"llmlab.generate: prompts_file={path}: no such file")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            prompts += [json.loads(line)["prompt"] for line in lines]
        else:
            prompts += lines
    if not prompts:
        raise SystemExit("llmlab.generate: give prompt=TEXT or prompts_file=PATH")
    return prompts


def resolve_model(path: str) -> tuple[str, str | None]:
    """(directory or hub name to load, the run's prompt template or None)."""
    p = Path(path)
    template = None
    if (p / "config_resolved.yaml").is_file():  # a run directory
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(p / "config_resolved.yaml")
        if cfg.stage.name != "pretrain":
            template = cfg.data.get("prompt_template")
        for sub in ("hf", "hf_adapter"):
            if (p / sub / "config.json").is_file() or (p / sub / "adapter_config.json").is_file():
                return str(p / sub), template
        raise SystemExit(f"llmlab.generate: {p} has no hf/ or hf_adapter/ (did training finish? "
                         f"`python -m llmlab.export {p}` exports from its checkpoint)")
    return path, template


def load(path: str, dtype=None):
    """Model (eval mode) and tokenizer; PEFT adapter directories load with their base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        from llmlab.peft import import_peft

        model = import_peft().AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text up to the first stop sequence (excluded)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


def generate(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    import torch

    from llmlab.callbacks.generation import generate_text

    torch.manual_seed(int(settings["seed"]))
    kwargs = dict(num_beams=int(settings["num_beams"]), do_sample=bool(settings["do_sample"]),
                  repetition_penalty=float(settings["repetition_penalty"]))
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
                      top_p=float(settings["top_p"]))
    stop = [s for s in settings["stop"] if s]
    if stop:
        kwargs.update(stop_strings=stop)  # generate_text hands HF the tokenizer it needs for these
    texts = []
    bs = max(1, int(settings["batch_size"]))
    for i in range(0, len(prompts), bs):
        texts += generate_text(model, tokenizer, prompts[i:i + bs], int(settings["max_new_tokens"]), **kwargs)
    return [cut_at_stop(t, stop) for t in texts]


def main(argv: list[str] | None = None) -> int:
    import torch

    path, settings = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(settings)
    model_path, run_template = resolve_model(path)
    template = settings["template"]
    template = run_template if template == "auto" else (None if template in ("none", "null", "") else template)
    if template is not None and "{prompt}" not in template:
        raise SystemExit(f"llmlab.generate: template={template!r} has no {{prompt}} placeholder")
    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    model, tokenizer = load(model_path, dtype)
    rendered = [template.format(prompt=p) if template else p for p in prompts]
    results = [{"prompt": p, "generated": g} for p, g in zip(prompts, generate(model, tokenizer, rendered, settings))]
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    print("\n".join(lines))
    if settings.get("out"):
        Path(settings["out"]).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
