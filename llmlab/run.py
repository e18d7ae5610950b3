"""`python -m llmlab.run [overrides]`: compose a run from config groups and train it.

Only Hydra is imported at module level so `--help` and `--cfg job` answer fast; the recipe itself
lives in llmlab/train.py.
"""
from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from llmlab.checkpointing import run_dir
from llmlab.checks.settings import check_run_dir_arguments
from llmlab.errors import (
    ConfigError,
    RunDiverged,
    fail,
    guard_hydra,
    is_user_error,
    one_line,
)
from llmlab.redact import redact_hydra_outputs, redact_logs, redact_text

log = logging.getLogger("llmlab")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Hydra reads `precision=32` as the integer 32 and refuses it as a group choice; quote numeric
# choices of these groups so the natural spelling works (also inside sweeps: precision=32,bf16-mixed).
NUMERIC_CHOICE_GROUPS = ("precision",)


def quote_numeric_choices(argv: list[str]) -> list[str]:
    pattern = re.compile(rf"^([~+]*(?:{'|'.join(NUMERIC_CHOICE_GROUPS)}))=(.+)$")
    out = []
    for arg in argv:
        m = pattern.match(arg)
        if m:
            items = [f"'{x}'" if x.isdigit() else x for x in m.group(2).split(",")]
            arg = f"{m.group(1)}={','.join(items)}"
        out.append(arg)
    return out


def _base_resolver(name: str) -> str:
    from llmlab.models.bases import ensure_base

    return ensure_base(name)


OmegaConf.register_new_resolver("llmlab_base", _base_resolver, use_cache=True, replace=True)


def model_name_of(pretrained) -> str:
    """A model's name from `model.pretrained`: a local directory's name (an llmlab run's export `<run>/hf`:
    `<run>/hf`), else the hub name as given."""
    text = str(pretrained).rstrip("/")
    path = Path(text).expanduser()
    if not (path.is_dir() or text.startswith((".", "/", "~"))):
        return text
    return f"{path.parent.name}/{path.name}" if path.name in ("hf", "hf_adapter") else path.name


OmegaConf.register_new_resolver("llmlab_model_name", model_name_of, replace=True)


def name_model_after_weights(cfg: DictConfig, overrides: list[str]) -> None:
    """`model.pretrained=<dir|hub name>` on the command line (without `model.name=`) names the run's model
    after those weights: `stage=sft model.pretrained=/models/Qwen2.5-0.5B` is Qwen2.5-0.5B in the console and
    summary.json, not the model file's name (tiny-base)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "model.pretrained" in keys and "model.name" not in keys and cfg.model.get("pretrained"):
        with open_dict(cfg):
            cfg.model.name = model_name_of(cfg.model.pretrained)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # nothing goes into the run dir (.hydra/, run.log) until the checks pass: train() commits it after
    # check_config and the resume checks; a refused command leaves an existing run dir byte-identical
    run_dir.begin(cfg)
    redact_hydra_outputs()  # Hydra wrote the command line verbatim (multirun.yaml): no credentials on disk
    try:
        from hydra.core.hydra_config import HydraConfig

        name_model_after_weights(cfg, list(HydraConfig.get().overrides.task))
        # pure-config rules first (no torch/lightning import: a typo fails in ~1 s, not ~10 s)
        from llmlab.checks.entry import check_settings

        check_settings(cfg)
        from llmlab.train import train

        return train(cfg)
    except RunDiverged as err:  # not a user error (exit 2) nor a crash: exit 1, summary.json says why
        run_dir.settle()
        if _is_multirun():  # the sweep goes on; summary.json already records status=diverged
            log.error("job diverged: %s", err)
            return math.nan
        if err.report:  # rank 0 says it once; the other ranks exit quietly
            fail(err, code=1)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - every failure is reported once, in one place
        user_error = is_user_error(err)
        writable = run_dir.settle()  # refused in an existing run dir: nothing is written there
        if _is_multirun():  # a failed sweep job must not stop the sweep: record it and go on
            if writable:
                from llmlab.train import record_failure

                record_failure(cfg, err)
            log.error("job failed: %s: %s", type(err).__name__, redact_text(one_line(err)), exc_info=not user_error)
            return math.nan
        if user_error:
            fail(err)
        raise
    finally:
        run_dir.settle()


if __name__ == "__main__":
    sys.argv = quote_numeric_choices(sys.argv)
    guard_hydra("train")
    redact_logs()
    try:
        check_run_dir_arguments(sys.argv[1:])  # Hydra creates the run dir before main(): check it first
    except ConfigError as err:
        fail(err)
    main()
