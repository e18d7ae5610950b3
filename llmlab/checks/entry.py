"""The two entry points of the checks, every rule before any weights load (messages name the setting and
the fix):
- `check_settings(cfg)`: the config alone, no torch/lightning/transformers import: runs first, so a typo
  fails in about a second;
- `check_config(cfg)`: everything, before any weights load (devices, compiler, strategy x PEFT, the PEFT
  targets on the meta model, preference data and models).

Each rule lives once, in the file of the config group it concerns (find a rule from its group):
- top-level settings of conf/train.yaml (seed, dry_run, compile, release_freed_memory, stop_at_step, resume,
  ckpt_path, resume_allow, paths.output_dir), and the typed-value helpers: settings.py;
- trainer (conf/trainer, and trainer.precision from the precision group: every value typed and bounded,
  fp16 needs a GPU), devices, the launcher, compile's compiler, release_freed_memory's glibc: trainer.py;
- data (sizes, fractions, workers, names, files, template, block size x model positions): data.py;
- stage (name, optimizer and schedule, PPO, GRPO, reward): stage.py; the preference stages' losses, data,
  reward and reference models: preference.py;
- model and peft (method, numbers, architecture sizes, weight files, the meta-device build, MoE router loss,
  PEFT x precision, target modules, loss chunking x model): model.py;
- strategy (x trainer x precision, x PEFT, load_full_weights, checkpoint kinds): strategy.py;
- callbacks (the lm-eval callback's task set and interval): callbacks.py;
- hub names while offline: hub.py.
"""
from __future__ import annotations

from llmlab.checks.callbacks import check_eval_callbacks
from llmlab.checks.data import check_data_settings
from llmlab.checks.hub import check_hub
from llmlab.checks.model import (
    check_architecture,
    check_attention_device,
    check_loss_chunking,
    check_model,
    check_peft,
    check_peft_settings,
)
from llmlab.checks.preference import check_preference, check_preference_losses
from llmlab.checks.settings import check_top_level
from llmlab.checks.stage import (
    check_optimization,
    check_stage_name,
    check_stage_settings,
)
from llmlab.checks.strategy import check_run
from llmlab.checks.trainer import (
    check_compile,
    check_devices,
    check_launcher,
    check_precision,
    check_release_freed_memory,
    check_trainer,
)


def check_settings(cfg) -> None:
    """Every rule that needs the config alone (no torch, lightning or transformers): runs first, so a
    mistyped number or name fails in about a second."""
    check_stage_name(cfg)
    check_top_level(cfg)  # seed, switches, resume, ckpt_path, the run dir
    check_launcher(cfg)
    check_trainer(cfg)
    check_precision(cfg)  # fp16 with trainer.accelerator=cpu (auto: check_devices)
    check_release_freed_memory(cfg)
    check_eval_callbacks(cfg)  # lm-eval during training: task names, hub
    check_optimization(cfg)
    check_peft_settings(cfg)
    check_stage_settings(cfg)
    check_preference_losses(cfg)
    check_data_settings(cfg)  # reads model.pretrained (a base model may be built to resolve it): late
    check_model(cfg)
    check_loss_chunking(cfg)
    check_hub(cfg)


def check_config(cfg) -> None:
    check_settings(cfg)  # launcher, precision, model among them
    check_devices(cfg)  # the accelerator exists; fp16 x accelerator=auto on a CPU machine
    check_compile(cfg)  # inductor's C++ compiler, before data and weights
    check_attention_device(cfg)  # flash_attention_2 / flex_attention x the device the run trains on
    check_run(cfg)  # strategy x trainer x precision x PEFT (llmlab/checks/strategy.py)
    model = check_architecture(cfg)  # transformers builds it on the meta device; router settings
    check_peft(cfg, model)  # target modules on the meta model
    check_preference(cfg)
