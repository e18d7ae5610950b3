"""Every cross-group rule, checked before any weights load. Messages name the setting and the fix."""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo")


def _model_positions(model_cfg) -> int | None:
    """Max positions of the configured architecture, without loading weights or touching the network.

    The `config:` values in the model file describe the architecture for hub models too; a local
    directory's config.json is read when there are none.
    """
    from llmlab.models import max_positions

    arch = dict(model_cfg.get("config") or {})
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(arch.get(key), int):
            return arch[key]
    path = model_cfg.get("pretrained")
    if model_cfg.init == "pretrained" and path and Path(path).is_dir():
        from transformers import AutoConfig

        return max_positions(AutoConfig.from_pretrained(path))
    return None


def check_precision(cfg) -> None:
    precision = str(cfg.trainer.precision)
    accelerator = str(cfg.trainer.accelerator)
    if precision.startswith("16") and accelerator == "cpu":
        raise ConfigError(f"precision={precision} (fp16 with loss scaling) needs a GPU; on CPU use "
                          f"precision=bf16-mixed or precision=bf16-true (fast on AMX), or precision=32")


def check_devices(cfg) -> None:
    """The accelerator asked for must exist on this machine (checked at run time, not in validation)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; use "
                              f"trainer.accelerator=cpu (with precision=bf16-mixed for speed on AMX CPUs)")


def check_model(cfg) -> None:
    m = cfg.model
    if m.init not in ("scratch", "pretrained"):
        raise ConfigError(f"model.init={m.init!r}: use scratch or pretrained")
    if m.init == "pretrained" and not m.get("pretrained"):
        raise ConfigError("model.init=pretrained needs model.pretrained=<hub name or local directory>")
    if m.init == "pretrained" and str(m.pretrained).startswith(("/", ".", "~")) and not Path(
            str(m.pretrained)).expanduser().is_dir():
        raise ConfigError(f"model.pretrained={m.pretrained}: no such directory (a local model needs its "
                          f"config.json and weights there)")
    if m.init == "scratch" and not m.get("config"):
        raise ConfigError(f"model={m.name} has no `config:` architecture; use model.init=pretrained")
    if m.init == "scratch" and m.get("tokenizer") is None and not m.get("pretrained"):
        raise ConfigError("model.tokenizer is null and there is no model.pretrained to take it from: "
                          "set model.tokenizer=builtin or a tokenizer name/path")


def check_data(cfg) -> None:
    from llmlab.data.sources import check_files

    d = cfg.data
    if d.source == "text":
        check_files(d.train_files, "data.train_files")
        if d.get("val_files"):
            check_files(d.val_files, "data.val_files")
    if d.get("packing") not in (None, "document", "concat"):
        raise ConfigError(f"data.packing={d.packing!r}: use document or concat")
    positions = _model_positions(cfg.model)
    if positions is not None and d.block_size > positions:
        raise ConfigError(f"data.block_size={d.block_size} exceeds the model's {positions} positions "
                          f"(model={cfg.model.name}); lower data.block_size to at most {positions}")


def check_config(cfg) -> None:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")
    check_precision(cfg)
    check_devices(cfg)
    check_model(cfg)
    if not cfg.dry_run:
        check_data(cfg)


def dry_run_report(cfg, module, info: dict, run_dir: Path) -> None:
    """`dry_run=true`: parameter counts (and a memory estimate) without training."""
    summary = {**info, "status": "dry_run", "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return None
