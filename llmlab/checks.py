"""Every cross-group rule, checked before any weights load. Messages name the setting and the fix.

Two entry points: `check_settings` (config alone, no torch/lightning/transformers import: runs first, so
a typo fails in about a second) and `check_config` (everything, before any weights load). The rules of
one concern live beside this file: `checks_model.py` (model, PEFT), `checks_strategy.py` (strategy x
trainer x precision x PEFT, checkpoint kinds), `preference_rules.py` (the DPO family, preference data,
reward models), `hub.py` (hub names while offline); here the trainer, data, launcher, optimizer and
per-stage settings.
"""
from __future__ import annotations

from pathlib import Path

from llmlab.checks_model import check_loss_chunking, check_model, check_model_settings, check_peft, local_config, model_positions
from llmlab.checks_strategy import check_run, uses_cpu
from llmlab.errors import ConfigError
from llmlab.hub import check_hub
from llmlab.precision import half_dtype
from llmlab.preference_rules import check_preference, check_preference_losses
from llmlab.zero3 import zero_stage

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "kto", "orpo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


def check_precision(cfg) -> None:
    precision = str(cfg.trainer.precision)
    accelerator = str(cfg.trainer.accelerator)
    if half_dtype(precision) == "float16" and accelerator == "cpu":
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


def check_data(cfg) -> None:
    from llmlab.data.sources import check_files

    d = cfg.data
    if d.source == "text":
        check_files(d.train_files, "data.train_files")
        if d.get("val_files"):
            check_files(d.val_files, "data.val_files")
    if d.get("packing") not in (None, "document", "concat"):
        raise ConfigError(f"data.packing={d.packing!r}: use document or concat")


def check_template(cfg) -> None:
    if cfg.stage.name == "pretrain":
        return
    template = cfg.data.get("prompt_template")
    if template is not None and "{prompt}" not in str(template):
        raise ConfigError(f"data.prompt_template={template!r} has no {{prompt}} placeholder; e.g. "
                          f"data.prompt_template='Question: {{prompt}}\\n\\nAnswer: '")


def check_launcher(cfg) -> None:
    """`launcher=slurm` acts on sweeps only: without -m Hydra would train here, silently."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import ListConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.runtime.choices.get("launcher") == "slurm" and hc.mode == RunMode.RUN and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError("launcher=slurm submits sweep jobs; without -m this run would train on this machine. "
                          "Add -m (one job is a sweep of one): python -m llmlab.run -m launcher=slurm ..., "
                          "or submit slurm/single_node.sbatch")
    # Several processes per job started by Lightning itself (no srun/torchrun) re-run the command line:
    # in a grid sweep the copies walk the same job list in step, but a search's copy would start a
    # second sweeper (asking its own trials) and the job would hang waiting for its other ranks.
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    n_proc = (len(devices) if isinstance(devices, (list, ListConfig)) else
              int(devices) if str(devices).isdigit() else 1) * (int(nodes) if str(nodes).isdigit() else 1)
    external = (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "LOCAL_RANK" in os.environ
                or "TORCHELASTIC_RUN_ID" in os.environ)
    sweeper = str(hc.sweeper.get("_target_", ""))
    if hc.mode == RunMode.MULTIRUN and n_proc > 1 and not external and not sweeper.endswith("BasicSweeper"):
        raise ConfigError(f"trainer.devices={devices} in a search sweep ({sweeper.rsplit('.', 1)[-1]}) on this "
                          f"machine: Lightning would start the other processes by re-running the command, which "
                          f"starts the sweeper again. Run the search with launcher=slurm (srun starts one process "
                          f"per device), or with trainer.devices=1")


def check_compile_settings(cfg) -> None:
    """`compile` is a switch: a mode name or a string there would be read as "on" by Python's truth test."""
    value = cfg.get("compile", False)
    if not isinstance(value, bool):
        raise ConfigError(f"compile={value!r}: give compile=true (the model's forward through torch.compile, "
                          f"inductor) or compile=false")


def check_release_freed_memory(cfg) -> None:
    """`release_freed_memory` is a switch, and on needs glibc's mallopt (llmlab.memory.release_freed_memory)."""
    value = cfg.get("release_freed_memory", False)
    if not isinstance(value, bool):
        raise ConfigError(f"release_freed_memory={value!r}: give release_freed_memory=true (freed blocks back to "
                          f"the OS at once) or release_freed_memory=false")
    if value:
        from llmlab.memory import glibc

        if glibc() is None:
            raise ConfigError("release_freed_memory=true sets glibc's malloc options, and this system's C library "
                              "is not glibc (no mallopt): set release_freed_memory=false")


def check_compile(cfg) -> None:
    """`compile=true` needs what inductor needs, checked before weights load: without them the run fails at its
    first forward, after data and model are built, with a ~120-line traceback (measured with CXX=/nonexistent/g++:
    `InductorError: InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx`)."""
    if not cfg.get("compile"):
        return
    from torch._dynamo.eval_frame import check_if_dynamo_supported

    try:  # this Python (3.15+, free-threaded before 3.13.3) has no torch.compile
        check_if_dynamo_supported()
    except RuntimeError as err:
        raise ConfigError(f"compile=true: {err}; use compile=false") from None
    if not uses_cpu(cfg.trainer.get("accelerator")):
        return
    try:  # inductor's CPU kernels are C++ it compiles: the compiler it would use ($CXX, else g++)
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001: only its own "no compiler" error is a refusal
        if type(err).__name__ != "InvalidCxxCompiler":
            return
        raise ConfigError(f"compile=true: inductor's CPU kernels need a C++ compiler and none works here ({err}); "
                          f"install g++ or set CXX to one, or use compile=false") from None


# --------------------------------------------------------------------------------------------------
# settings: pure-config rules, run before torch/lightning/transformers are imported (fail in ~1 s)
# --------------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "linear", "constant")
FIELD_KEYS = ("text_field", "prompt_field", "response_field", "instruction_field", "input_field", "output_field",
              "messages_field", "chosen_field", "rejected_field")


def _number(value, setting: str, example: str) -> float:
    """A numeric setting as float; ConfigError naming it when it is text or null."""
    if isinstance(value, bool):
        value = None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}={value!r} is not a number; e.g. {setting}={example}") from None


def check_trainer(cfg) -> None:
    """trainer.max_steps / val_check_interval / devices: numbers Lightning would refuse mid-setup."""
    t = cfg.trainer
    steps = t.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps > 0 or steps == -1):
        raise ConfigError(f"trainer.max_steps={steps!r}: give a number of optimizer steps >= 1 (or -1 with "
                          f"trainer.max_epochs=N), e.g. trainer.max_steps=100")
    vci = t.get("val_check_interval")
    if vci is not None and (isinstance(vci, bool) or not isinstance(vci, (int, float)) or vci <= 0):
        raise ConfigError(f"trainer.val_check_interval={vci!r}: give a step interval >= 1 (or a fraction of an "
                          f"epoch in (0, 1]), e.g. trainer.val_check_interval=100")
    for key in ("accumulate_grad_batches", "num_nodes"):
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"trainer.{key}={v!r}: give an integer >= 1")


def check_optimization(cfg) -> None:
    """stage.module.optimizer.lr and the warmup schedule of llmlab.optim."""
    module = cfg.stage.get("module") or {}
    opt = module.get("optimizer") or {}
    if "lr" in opt:
        lr = _number(opt.lr, "stage.module.optimizer.lr", "3e-4")
        if not lr > 0 or lr != lr or lr == float("inf"):
            raise ConfigError(f"stage.module.optimizer.lr={opt.lr}: the learning rate must be a positive number, "
                              f"e.g. stage.module.optimizer.lr=3e-4")
    if "weight_decay" in opt and _number(opt.weight_decay, "stage.module.optimizer.weight_decay", "0.01") < 0:
        raise ConfigError(f"stage.module.optimizer.weight_decay={opt.weight_decay}: must be >= 0")
    sched = module.get("scheduler") or {}
    if str(sched.get("_target_", "")) == "llmlab.optim.warmup_schedule":
        name = sched.get("name", "cosine")
        if name not in SCHEDULES:
            raise ConfigError(f"stage.module.scheduler.name={name!r}: use one of {', '.join(SCHEDULES)}")
        warmup = sched.get("warmup_steps", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"stage.module.scheduler.warmup_steps={warmup!r}: give an integer >= 0")
        ratio = _number(sched.get("min_lr_ratio", 0.0), "stage.module.scheduler.min_lr_ratio", "0.1")
        if not 0 <= ratio <= 1:
            raise ConfigError(f"stage.module.scheduler.min_lr_ratio={ratio}: give a fraction in [0, 1]")


def check_peft_numbers(cfg) -> None:
    """peft.r / alpha / dropout of the LoRA family (PEFT itself fails late with a traceback)."""
    p = cfg.get("peft") or {}
    if p.get("method") in (None, "none"):
        return
    if "r" in p and (isinstance(p.r, bool) or not isinstance(p.r, int) or p.r < 1):
        raise ConfigError(f"peft.r={p.r!r}: the LoRA rank must be an integer >= 1, e.g. peft.r=8 (or peft=none "
                          f"for full fine-tuning)")
    if "alpha" in p and _number(p.alpha, "peft.alpha", "16") <= 0:
        raise ConfigError(f"peft.alpha={p.alpha}: must be > 0 (the update is scaled by alpha/r), e.g. peft.alpha=16")
    if "dropout" in p and not 0 <= _number(p.dropout, "peft.dropout", "0.05") < 1:
        raise ConfigError(f"peft.dropout={p.dropout}: give a probability in [0, 1)")


def check_data_settings(cfg) -> None:
    """Sizes, field names and the prompt template of the data node."""
    d, stage = cfg.data, cfg.stage.name
    for key in ("block_size", "batch_size"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"data.{key}={v!r}: give an integer >= 1")
    if d.get("source") == "text" and not cfg.get("dry_run"):  # local files exist, readable types
        from llmlab.data.sources import check_files

        check_files(d.get("train_files"), "data.train_files")
        if d.get("val_files"):
            check_files(d.val_files, "data.val_files")
    for key in FIELD_KEYS:
        if key in d and (d.get(key) is None or str(d.get(key)).strip() == ""):
            raise ConfigError(f"data.{key} is null: name the record field to read, e.g. data.{key}="
                              f"{key.removesuffix('_field')}")
    template = d.get("prompt_template")
    if stage != "pretrain" and template is not None:
        check_template_text(str(template), "data.prompt_template")
    positions = model_positions(cfg.model)
    if not cfg.get("dry_run") and positions is not None and isinstance(d.get("block_size"), int) \
            and d.block_size > positions:
        source = f"model.pretrained={cfg.model.pretrained}" if local_config(cfg.model) else f"model={cfg.model.name}"
        raise ConfigError(f"data.block_size={d.block_size} exceeds the model's {positions} positions "
                          f"({source}); lower data.block_size to at most {positions}")


def check_template_text(template: str, setting: str) -> None:
    """A prompt template: one `{prompt}` placeholder; any other brace must be doubled ({{ and }})."""
    example = f"{setting}='Question: {{prompt}}\\n\\nAnswer: '"
    if "{prompt}" not in template:
        raise ConfigError(f"{setting}={template!r} has no {{prompt}} placeholder; e.g. {example}")
    try:
        template.format(prompt="")
    except (KeyError, ValueError, IndexError, AttributeError) as err:
        raise ConfigError(f"{setting}={template!r}: braces other than {{prompt}} must be doubled to be literal "
                          f"({{{{ and }}}}), e.g. 'JSON {{{{\"q\": {{prompt}}}}}}' "
                          f"({type(err).__name__}: {err})") from None


def response_length_bounds(value) -> tuple[int, int]:
    """(min, max) tokens per PPO response from stage.module.response_length=[min, max], 1 <= min <= max."""
    from omegaconf import ListConfig

    ok = isinstance(value, (list, tuple, ListConfig)) and len(value) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value) and 1 <= value[0] <= value[1]
    if not ok:
        raise ConfigError(f"stage.module.response_length={value}: give [min, max] token budgets with 1 <= "
                          f"min <= max, e.g. stage.module.response_length=[8,16]")
    return int(value[0]), int(value[1])


def check_grpo_args(num_generations, batch_size, mini_batch_size, micro_batch_size, loss_type, scale_rewards,
                    importance_sampling_level, num_iterations, temperature) -> None:
    """GRPOModule's settings (its constructor runs this too; here before torch is imported)."""
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ConfigError(f"stage.module.num_generations={num_generations}: GRPO compares completions within a "
                          f"group, it needs >= 2 per prompt; e.g. stage.module.num_generations=8")
    n = batch_size * num_generations if batch_size else None
    for key, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
        if value is not None and (value < 1 or (n and n % value)):
            raise ConfigError(f"stage.module.{key}={value}: a rollout of {batch_size} prompts x {num_generations} "
                              f"completions = {n} must divide into batches of {key}; use a divisor of {n} or null")
    if micro_batch_size and mini_batch_size and mini_batch_size % micro_batch_size:
        raise ConfigError(f"stage.module.micro_batch_size={micro_batch_size} must divide "
                          f"stage.module.mini_batch_size={mini_batch_size}")
    for key, value, allowed in (("loss_type", loss_type, GRPO_LOSS_TYPES), ("scale_rewards", scale_rewards, SCALE_REWARDS),
                                ("importance_sampling_level", importance_sampling_level, IS_LEVELS)):
        if value not in allowed:
            raise ConfigError(f"stage.module.{key}={value}: use one of {', '.join(allowed)}")
    if num_iterations < 1:
        raise ConfigError(f"stage.module.num_iterations={num_iterations}: passes over each rollout, need >= 1")
    if temperature <= 0:
        raise ConfigError(f"stage.module.temperature={temperature}: rollouts sample, need > 0")


def _module_exists(path: str) -> bool:
    import importlib.util

    mod = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    try:
        return bool(mod) and importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def check_reward_settings(cfg) -> None:
    """The `reward` group (grpo, ppo): every entry's target and function module can be found."""
    from omegaconf import OmegaConf

    group = cfg.get("reward") or {}
    missing = sorted(OmegaConf.missing_keys(group)) if group else []
    if missing:
        key = missing[0] if missing[0].startswith("reward.") else f"reward.{missing[0]}"
        raise ConfigError(f"{key}: has no value (???); set it, e.g. {key}=<value>")
    for name in group:
        node = group[name]
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if not target:
            raise ConfigError(f"reward.{name}: needs a _target_ (a reward class or function path), e.g. reward=task")
        if not _module_exists(str(target)):
            raise ConfigError(f"reward.{name}._target_={target}: no such module to import")
        fn = node.get("fn") if not OmegaConf.is_missing(node, "fn") else None
        if fn is not None and not _module_exists(str(fn)):
            raise ConfigError(f"reward.{name}.fn={fn}: no such module to import; give module:function (on "
                              f"PYTHONPATH) with signature (prompts, completions, **fields) -> list[float]")


def check_stage_settings(cfg) -> None:
    """PPO's response budget and reward source, resume settings, DeepSpeed's load_full_weights."""
    import importlib.util

    module = cfg.stage.get("module") or {}
    if cfg.stage.name == "ppo":
        if "response_length" in module:
            response_length_bounds(module.response_length)
        rule = module.get("rule_reward")
        if rule and not module.get("reward_model"):
            mod, _, fn = str(rule).rpartition(".")
            try:
                found = bool(mod and fn) and importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ConfigError(f"stage.rule_reward={rule}: no such module to import; give the dotted path of a "
                                  f"function(response, answer) -> float, e.g. llmlab.data.builtin.rule_reward")
    if cfg.stage.name in ("grpo", "ppo"):
        check_reward_settings(cfg)
    if cfg.stage.name == "grpo":
        m = module
        check_grpo_args(m.get("num_generations"), cfg.data.get("batch_size"), m.get("mini_batch_size"),
                        m.get("micro_batch_size"), m.get("loss_type"), m.get("scale_rewards"),
                        m.get("importance_sampling_level"), int(m.get("num_iterations") or 1),
                        float(m.get("temperature") or 1.0))
        if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
            raise ConfigError("stage=grpo steps its optimizer per mini-batch itself: set "
                              "trainer.accumulate_grad_batches=1 (use stage.module.micro_batch_size)")
    strategy = cfg.get("strategy") or {}
    if strategy.get("load_full_weights") and zero_stage(strategy) != 3:
        raise ConfigError(f"strategy.load_full_weights=true only applies to ZeRO-3 (strategy=zero3), not "
                          f"strategy={strategy.get('name', '?')}: resume a single-file checkpoint with the strategy it "
                          f"was written with (e.g. strategy=ddp), or use strategy=zero3")
    if cfg.get("resume") not in (None, "none", "auto"):
        raise ConfigError(f"resume={cfg.resume!r}: use resume=auto (continue from the run dir's last checkpoint), "
                          f"or ckpt_path=<file>")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(str(ckpt)).expanduser().exists():
        raise ConfigError(f"ckpt_path={ckpt}: no such checkpoint file (or DeepSpeed checkpoint directory)")



def check_settings(cfg) -> None:
    """Every rule that needs the config alone (no torch, lightning or transformers): runs first, so a
    mistyped number or name fails in about a second."""
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")
    check_launcher(cfg)
    check_trainer(cfg)
    check_compile_settings(cfg)
    check_release_freed_memory(cfg)
    from llmlab.evaluation import check_eval_callbacks  # lm-eval during training: task names, hub

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
    check_run(cfg)  # strategy x trainer x precision x PEFT (llmlab/checks_strategy.py)
    check_peft(cfg)
    check_template(cfg)
    check_preference(cfg)
    if not cfg.dry_run:
        check_data(cfg)

