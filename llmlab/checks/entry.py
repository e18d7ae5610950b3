"""The two entry points of the checks, every rule before any weights load (messages name the setting and
the fix):
- `check_settings(cfg)`: the config alone, no torch/lightning/transformers import: runs first, so a typo
  fails in about a second;
- `check_config(cfg)`: everything, before any weights load (devices, compiler, strategy x PEFT, data files).
Each rule lives in the file of the config group it concerns: settings.py (typed values), trainer.py,
data.py, stage.py, model.py (model + PEFT), strategy.py (strategy x trainer x precision x PEFT, checkpoint
kinds), preference.py (the DPO family, preference data, reward models), hub.py (hub names while offline).
"""
from __future__ import annotations

from llmlab.checks.data import check_data_settings
from llmlab.checks.hub import check_hub
from llmlab.checks.model import (
    check_loss_chunking,
    check_model,
    check_model_settings,
    check_peft,
    check_peft_numbers,
)
from llmlab.checks.preference import check_preference, check_preference_losses
from llmlab.checks.stage import STAGES, check_optimization, check_stage_settings
from llmlab.checks.strategy import check_precision, check_run
from llmlab.checks.trainer import (
    check_compile,
    check_compile_settings,
    check_devices,
    check_launcher,
    check_release_freed_memory,
    check_trainer,
)
from llmlab.errors import ConfigError


def check_settings(cfg) -> None:
    """Every rule that needs the config alone (no torch, lightning or transformers): runs first, so a
    mistyped number or name fails in about a second."""
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")
    check_launcher(cfg)
    check_trainer(cfg)
    check_compile_settings(cfg)
    check_release_freed_memory(cfg)
    from llmlab.evaluation.harness import (
        check_eval_callbacks,  # lm-eval during training: task names, hub
    )

    check_eval_callbacks(cfg)
    check_precision(cfg)
    check_optimization(cfg)
    check_peft_numbers(cfg)
    check_stage_settings(cfg)
    check_preference_losses(cfg)
    check_data_settings(cfg)  # reads model.pretrained (a base model may be built to resolve it): late
    check_model_settings(cfg)
    check_loss_chunking(cfg)
    check_model(cfg)
    check_hub(cfg)


def check_config(cfg) -> None:
    check_settings(cfg)  # launcher, precision, model among them
    check_devices(cfg)
    check_compile(cfg)  # inductor's C++ compiler, before data and weights
    check_run(cfg)  # strategy x trainer x precision x PEFT (llmlab/checks/strategy.py)
    check_peft(cfg)
    check_preference(cfg)
