"""`python -m llmlab.eval MODEL [eval=builtin|course|perplexity] [key=value ...]`: benchmark a model with
EleutherAI's lm-evaluation-harness (conf/eval.yaml lists the settings; `--help` answers without torch).

MODEL is a run dir, an HF model dir, a PEFT adapter dir, an export (hf/, llmlab's int8, a GGUF file or its
gguf-<quant>/ directory: llama.cpp scores it, llmlab/evaluation/llamacpp_lm.py) or a hub name. A run dir is evaluated as the
stage exported it: `hf/` (the merged model), or with `load=adapter` the run's base rebuilt as it was
trained (4-bit for QLoRA, `llmlab.models.peft.apply_peft`) with `hf_adapter/`'s weights; `load=auto` picks
the adapter for QLoRA and prefix/prompt runs (the merged QLoRA model is de-quantized: close to, not
the same as, what was trained and validated). Results: `eval.json` (per task: metrics, stderr, task
version; the lm-eval version), a table on stdout, and for a run dir `eval/<task>/<metric>` in its own
loggers (metrics.csv, TensorBoard, W&B offline) at its last step.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llmlab.distributed.precision import autocast_dtype
from llmlab.errors import ConfigError, fail, guard_hydra, is_user_error
from llmlab.evaluation.harness import CHAT, check_task_set, evaluate, flat_metrics, table_rows
from llmlab.models.gguf import INSTALL, is_gguf, llama_cpp_version
from llmlab.models.load import load, resolve_model
from llmlab.models.peft import apply_peft, import_peft, quantization_config
from llmlab.redact import redact_logs

log = logging.getLogger("llmlab")


def _run_config(path: Path):
    return OmegaConf.load(path / "config_resolved.yaml") if (path / "config_resolved.yaml").is_file() else None


def check_eval_settings(cfg: DictConfig) -> None:
    """Everything checkable before torch: the settings, the task set (names, hub while offline), the
    model path (a run dir must have an export)."""
    if cfg.load not in ("auto", "merged", "adapter"):
        raise ConfigError(f"load={cfg.load!r}: use auto, merged (hf/) or adapter (base + hf_adapter/)")
    if cfg.autocast not in ("auto", "bf16", "none", None):
        raise ConfigError(f"autocast={cfg.autocast!r}: use auto (a run's own precision), bf16 or none")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r}: give an integer >= 1, e.g. batch_size=8")
    if cfg.num_fewshot is not None and (not isinstance(cfg.num_fewshot, int) or cfg.num_fewshot < 0):
        raise ConfigError(f"num_fewshot={cfg.num_fewshot!r}: give an integer >= 0 (or null: each task's default)")
    limit = cfg.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit > 1)):
        raise ConfigError(f"limit={limit!r}: give a number of documents (>= 1) or a fraction in (0, 1]")
    check_task_set(cfg.eval)
    path = Path(str(cfg.path)).expanduser()
    run_cfg = _run_config(path)
    if run_cfg is not None:
        has_hf, has_adapter = (path / "hf" / "config.json").is_file(), (path / "hf_adapter" / "adapter_config.json").is_file()
        if not (has_hf or has_adapter):
            raise ConfigError(f"MODEL={path}: a run dir without an export (no hf/ nor hf_adapter/: did training "
                              f"finish?); export it first: python -m llmlab.export {path}")
        if cfg.load == "merged" and not has_hf:
            raise ConfigError(f"load=merged: {path} has no hf/ (prefix/prompt tuning exports an adapter only); "
                              f"use load=adapter")
        if cfg.load == "adapter" and not has_adapter:
            raise ConfigError(f"load=adapter: {path} has no hf_adapter/ (not a PEFT run); use load=merged")
    else:
        if cfg.load == "adapter":
            raise ConfigError(f"load=adapter is for a run dir; {path} is not one (a PEFT adapter dir loads with "
                              f"its base by itself)")
        resolve_model(str(cfg.path))  # no such dir / hub unreachable: one line, before torch
        if is_gguf(path):
            check_gguf_settings(cfg, path)


def check_gguf_settings(cfg: DictConfig, path: Path) -> None:
    """A GGUF export is scored by llama.cpp with the weights' types chosen at export: nothing of torch's applies."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"MODEL={path} is a GGUF export, which llama.cpp evaluates: llama-cpp-python is not "
                          f"installed; {INSTALL}")
    if cfg.get("dtype"):
        raise ConfigError(f"dtype={cfg.dtype}: {path} is a GGUF export, whose weights' type was chosen at export "
                          f"(quantize=); leave dtype unset")
    if cfg.autocast not in ("auto", "none", None):
        raise ConfigError(f"autocast={cfg.autocast}: {path} is a GGUF export, which llama.cpp computes in its own "
                          f"types; leave autocast unset")
    if cfg.template == CHAT:  # lm-eval's chat route needs the transformers tokenizer's apply_chat_template
        raise ConfigError(f"template=chat: {path} is a GGUF export, scored by llama.cpp without lm-eval's chat "
                          f"route here; use template=auto, none or a '{{prompt}}' template (or evaluate the hf/ export)")


def _uses_adapter(cfg, run_cfg, path: Path) -> bool:
    if cfg.load != "auto":
        return cfg.load == "adapter"
    has_hf = (path / "hf" / "config.json").is_file()
    return not has_hf or run_cfg.peft.get("method") == "qlora"


def load_run_adapter(path: Path, run_cfg):
    """The run's model rebuilt as it was trained (base, 4-bit for QLoRA, PEFT structure from the run's
    config) with the adapter weights of `hf_adapter/`; eval mode."""
    # lazy (torch, transformers, lightning here and below): `check_eval_settings` answers before they load,
    # and --help without them
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from llmlab.models.build import build_model
    from llmlab.stages.build import keep_4bit_layout

    if run_cfg.model.init != "pretrained":
        raise ConfigError(f"load=adapter: {path} trained its base from scratch (model.init=scratch): only hf/ holds "
                          f"those weights; use load=merged")
    adapter = path / "hf_adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = build_model(run_cfg.model, tokenizer,
                       quantization_config=quantization_config(run_cfg.peft, run_cfg.trainer.precision))
    model = apply_peft(base, run_cfg.peft)
    keep_4bit_layout(model)
    peft = import_peft()
    weights = adapter / "adapter_model.safetensors"
    result = peft.set_peft_model_state_dict(model, load_file(str(weights)))
    missing = [k for k in getattr(result, "unexpected_keys", []) or []]
    if missing:
        raise ConfigError(f"load=adapter: {weights} does not fit the run's PEFT config ({missing[0]}); use "
                          f"load=merged")
    return model.eval(), tokenizer


def load_model(cfg):
    """(model, tokenizer, run_cfg or None, what was loaded) as `cfg.load` asks."""
    import torch  # lazy: see load_run_adapter

    path = Path(str(cfg.path)).expanduser()
    run_cfg = _run_config(path)
    dtype = getattr(torch, cfg.dtype) if cfg.get("dtype") else None
    if run_cfg is not None and _uses_adapter(cfg, run_cfg, path):
        model, tokenizer = load_run_adapter(path, run_cfg)
        return model, tokenizer, run_cfg, f"{path} (base {run_cfg.model.pretrained} + hf_adapter/, as trained)"
    where = str(path / "hf") if run_cfg is not None else resolve_model(str(cfg.path))[0]
    if is_gguf(where):  # lm-eval's model interface over llama.cpp in this process (no tokenizer of transformers)
        from llmlab.evaluation.llamacpp_lm import LlamaCppLM

        return LlamaCppLM(where), None, None, f"{where} (llama.cpp {llama_cpp_version()})"
    model, tokenizer = load(where, dtype)
    return model, tokenizer, run_cfg, where


def run_template(cfg, run_cfg) -> str | None:
    if cfg.template != "auto":
        return None if cfg.template in (None, "none", "null", "") else str(cfg.template)
    if run_cfg is not None and run_cfg.stage.name != "pretrain" and run_cfg.data.get("record_format") == CHAT:
        return CHAT  # a run whose prompts went through its chat template is scored as it was trained
    if run_cfg is not None and run_cfg.stage.name != "pretrain" and run_cfg.data.get("prompt_template"):
        return str(run_cfg.data.prompt_template)
    return None


def log_to_run(path: Path, run_cfg, metrics: dict[str, float]) -> list[str]:
    """Log `metrics` into the run's own loggers (its logger config), at the run's last step."""
    step = 0
    try:
        step = int(json.loads((path / "summary.json").read_text()).get("global_step") or 0)
    except (OSError, ValueError):
        pass
    used = []
    for name, node in (run_cfg.get("logger") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            logger = instantiate(node)
            logger.log_metrics(metrics, step=step)
            logger.finalize("success")
            used.append(name)
        except Exception as err:  # noqa: BLE001 - a logger that cannot start here must not lose eval.json
            log.warning("eval: could not log to the run's %s logger: %s", name, err)
    return used


def print_table(result: dict, title: str) -> None:
    try:  # rich when installed (optional here), else plain lines
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("task", "version", "metric", "value", "stderr"):
            table.add_column(col, justify="right" if col in ("value", "stderr") else "left")
        for row in table_rows(result):
            table.add_row(*row)
        Console(width=120).print(table)
    except ImportError:
        print(title)
        for row in table_rows(result):
            print(" | ".join(row))


def evaluate_cli(cfg: DictConfig) -> dict:
    check_eval_settings(cfg)
    import torch  # lazy: see load_run_adapter

    model, tokenizer, run_cfg, loaded = load_model(cfg)
    mode = str(cfg.autocast)
    if mode == "auto":
        # as the run validated: bf16-mixed (or bare bf16)
        mode = "bf16" if run_cfg is not None and autocast_dtype(run_cfg.trainer.precision) == "bfloat16" else "none"
    autocast = torch.bfloat16 if mode == "bf16" else None
    result = evaluate(model, tokenizer, cfg.eval, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                      batch_size=cfg.batch_size, gen_kwargs=OmegaConf.to_container(cfg.gen_kwargs) or None,
                      template=run_template(cfg, run_cfg), autocast_dtype=autocast, seed=cfg.seed)
    path = Path(str(cfg.path)).expanduser()
    result.update(model=str(cfg.path), loaded=loaded, autocast=mode, batch_size=cfg.batch_size,
                  data=OmegaConf.to_container(cfg.eval.get("data") or {}))
    out = Path(str(cfg.out)).expanduser() if cfg.out else (path / "eval.json" if run_cfg is not None else
                                                           Path("eval.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    if run_cfg is not None and cfg.log_to_run:
        result["logged_to"] = log_to_run(path, run_cfg, flat_metrics(result, "eval/"))
    print_table(result, f"{cfg.path} | eval={cfg.eval.name} | lm-eval {result['lm_eval_version']} | "
                        f"{result['seconds']} s")
    print(f"eval.json: {out}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate_cli(cfg)
    except Exception as err:  # noqa: BLE001 - user errors: one line, exit 2; anything else: traceback
        if is_user_error(err):
            fail(err)
        raise


def model_argument(argv: list[str]) -> list[str]:
    """The first argument (MODEL, no `=`) becomes the override `model=<it>` (quoted for Hydra)."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        value = argv[1].replace("\\", "\\\\").replace("'", "\\'")
        argv = [argv[0], f"path='{value}'", *argv[2:]]
    return argv


if __name__ == "__main__":
    sys.argv = model_argument(sys.argv)
    if not any(a.startswith(("path=", "--help", "-h", "--hydra-help", "--cfg", "--info")) for a in sys.argv[1:]):
        fail("give the model first: python -m llmlab.eval MODEL [eval=builtin|course|perplexity] (MODEL: a run "
             "dir, an HF model dir, a PEFT adapter dir, an export (int8, GGUF) or a hub name; --help lists the "
             "settings)")
    guard_hydra("eval")
    redact_logs()
    main()
