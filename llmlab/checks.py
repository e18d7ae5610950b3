"""Every cross-group rule, checked before any weights load. Messages name the setting and the fix."""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.checks_strategy import check_run
from llmlab.errors import ConfigError
from llmlab.precision import weights_dtype
from llmlab.preference_rules import check_preference_losses
from llmlab.zero3 import is_deepspeed, strategy_name, zero_stage

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "kto", "orpo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


def local_model_dir(model_cfg) -> Path | None:
    """`model.pretrained` as a local directory (init=pretrained), else None (a hub name, or scratch)."""
    path = model_cfg.get("pretrained") if model_cfg.get("init") == "pretrained" else None
    if not path:
        return None
    path = Path(str(path)).expanduser()
    return path if path.is_dir() else None


def local_config(model_cfg) -> dict | None:
    """A local model directory's config.json (the architecture that will load), else None."""
    path = local_model_dir(model_cfg)
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained={path}: config.json is not readable JSON ({err}); re-export "
                          f"the model with save_pretrained") from None


def _model_positions(model_cfg) -> int | None:
    """Max positions of the architecture that will be built, without loading weights or the network.

    A local directory's config.json wins (it is what from_pretrained loads: `model=gpt2
    model.pretrained=<a llama dir>` is a llama); else the `config:` values of the model file.
    """
    arch = local_config(model_cfg) or dict(model_cfg.get("config") or {})
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(arch.get(key), int) and arch[key] > 0:
            return arch[key]
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


def _architecture_on_meta(cfg):
    """The configured model built on the meta device (module names only: no memory, no weights), or
    None when its architecture cannot be known offline (a hub model without `config:` values)."""
    import torch

    from llmlab.models import architecture_config

    m, head = cfg.model, cfg.stage.get("head", "causal_lm")
    local = local_model_dir(m)
    if local is not None:  # what from_pretrained will load, whatever the yaml `config:` says
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(local), trust_remote_code=False)
    elif m.get("config"):
        config = architecture_config(m, None, head)
    else:
        return None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def check_peft(cfg) -> None:
    """PEFT x model x precision x data rules (llmlab/peft.py), before any weights load."""
    import importlib.util

    from llmlab import peft as peft_lib

    p = cfg.peft
    method = p.method
    if method not in peft_lib.METHODS:
        raise ConfigError(f"peft.method={method!r}: use one of {peft_lib.METHODS} (peft=<name>)")
    if method == "none":
        return
    if method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("peft=qlora needs bitsandbytes (4-bit NF4): pip install 'llmlab[bnb]' "
                              "(bitsandbytes>=0.45), or use peft=lora")
        if cfg.model.init != "pretrained" and not cfg.dry_run:
            raise ConfigError(f"peft=qlora quantizes pretrained weights as they load, but model.init="
                              f"{cfg.model.init}; use model.init=pretrained (or peft=lora; dry_run=true "
                              f"estimates QLoRA on an init=scratch architecture)")
        q = p.quantization
        precision = str(cfg.trainer.precision)
        compute = str(q.compute_dtype)
        if precision.startswith("16") and compute != "float16":
            raise ConfigError(f"peft=qlora computes in peft.quantization.compute_dtype={compute} but "
                              f"precision={precision} is fp16: set peft.quantization.compute_dtype=float16 "
                              f"or precision=bf16-mixed / bf16-true")
        if precision.startswith("bf16") and compute == "float16":
            raise ConfigError(f"peft=qlora with precision={precision} needs "
                              f"peft.quantization.compute_dtype=bfloat16 (got float16)")
        storage = q.get("quant_storage")
        true_dtype = weights_dtype(precision)
        if precision.endswith("-true") and storage not in (None, "uint8", "int8") and storage != true_dtype:
            raise ConfigError(f"precision={precision} casts float tensors, including 4-bit weights packed "
                              f"in peft.quantization.quant_storage={storage}: use quant_storage=null (uint8) "
                              f"or {true_dtype}")
        # qlora x strategy (ZeRO-3 needs float storage: set automatically): checks_strategy.check_run
    if method == "lora_int8":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("peft=lora_int8 needs bitsandbytes (LLM.int8): pip install 'llmlab[bnb]' "
                              "(bitsandbytes>=0.45), or use peft=lora")
        if cfg.model.init != "pretrained" and not cfg.dry_run:
            raise ConfigError(f"peft=lora_int8 quantizes pretrained weights as they load, but model.init="
                              f"{cfg.model.init}; use model.init=pretrained (or peft=lora)")
        strategy = cfg.get("strategy") or {}
        if is_deepspeed(strategy) or "fsdp" in str(strategy.get("_target_", "")).lower():
            raise ConfigError(f"peft=lora_int8 with strategy={strategy_name(strategy)}: bitsandbytes int8 "
                              f"weights x DeepSpeed/FSDP sharding is not supported by llmlab; use strategy=ddp "
                              f"(or the default), or peft=qlora (4-bit, works with strategy=zero3)")
    if method in peft_lib.PROMPT_LEARNING:
        if cfg.stage.name == "pretrain" and cfg.data.get("packing", "document") == "document":
            raise ConfigError(f"peft={method} prepends virtual tokens, which the block-diagonal masks of "
                              f"packed documents cannot take: set data.packing=concat with stage=pretrain")
        if cfg.data.get("pack_examples"):
            raise ConfigError(f"peft={method} prepends virtual tokens, which packed examples' masks cannot "
                              f"take: set data.pack_examples=false")
    else:
        model = _architecture_on_meta(cfg)
        if model is not None:
            peft_lib.check_fits(p, model, cfg.model.name)


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


def _first_record(path: Path) -> dict | None:
    """The first record of a .jsonl/.json file (cheap peek), else None."""
    try:
        if path.suffix == ".jsonl":
            with path.open() as f:
                line = next((ln for ln in f if ln.strip()), None)
            return json.loads(line) if line else None
        if path.suffix == ".json" and path.stat().st_size < 50_000_000:
            data = json.loads(path.read_text())
            rows = data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [])
            return rows[0] if rows and isinstance(rows[0], dict) else None
    except (OSError, ValueError, StopIteration):
        return None
    return None


def _sequence_classifier_config(path: str, setting: str):
    """The config of a reward model (a run dir, HF dir or hub name); ConfigError unless it is a
    one-output sequence classifier."""
    from transformers import AutoConfig

    from llmlab.stages.alignment import hf_dir

    source = hf_dir(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{setting}={path}: no model config there ({err}); give a stage=rm run dir, its hf/ "
                          f"directory, or a hub name of a sequence classifier (needs internet)") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{setting}={path} is not a sequence classifier (architectures: {archs}); a reward "
                          f"model is what stage=rm exports (AutoModelForSequenceClassification, one output)")
    if getattr(config, "num_labels", 1) != 1:
        raise ConfigError(f"{setting}={path} has {config.num_labels} outputs; a reward model has one score")
    return config


def check_preference(cfg) -> None:
    """Rules of the preference stages (rm, dpo, ppo), before any weights load."""
    stage, data = cfg.stage, cfg.data
    module = stage.get("module") or {}
    if stage.name in ("rm", "dpo", "orpo", "simpo") and data.source == "text" and not cfg.dry_run:
        chosen, rejected = data.get("chosen_field", "chosen"), data.get("rejected_field", "rejected")
        for f in ([data.train_files] if isinstance(data.train_files, str) else list(data.train_files or [])):
            record = _first_record(Path(str(f)).expanduser())
            missing = [n for n in (chosen, rejected) if record is not None and n not in record]
            if missing:
                raise ConfigError(f"stage={stage.name} needs preference pairs, but {f} has no field(s) {missing} "
                                  f"(fields: {sorted(record)}); set data.chosen_field / data.rejected_field")
    if stage.name == "kto" and data.source == "text" and not cfg.dry_run:
        from llmlab.preference_rules import check_kto_record

        for f in ([data.train_files] if isinstance(data.train_files, str) else list(data.train_files or [])):
            check_kto_record(_first_record(Path(str(f)).expanduser()), data, str(f))
    if stage.name == "ppo":
        if not module.get("reward_model") and not module.get("rule_reward") and not cfg.get("reward"):
            raise ConfigError("stage=ppo has no reward source: set stage.reward_model=<stage=rm run dir or HF "
                              "path of a sequence classifier>, or stage.rule_reward=<function(response, "
                              "answer)>, e.g. llmlab.data.builtin.rule_reward with data=builtin")
        if module.get("reward_model"):
            _sequence_classifier_config(str(module.reward_model), "stage.reward_model")
        if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
            raise ConfigError("stage=ppo steps its optimizer per PPO mini-batch itself: set "
                              "trainer.accumulate_grad_batches=1 (use stage.module.mini_batch_size)")
        if int(module.get("mini_batch_size") or 1) < 1 or int(module.get("ppo_epochs") or 1) < 1:
            raise ConfigError("stage.module.mini_batch_size and stage.module.ppo_epochs must be >= 1")
        # several processes are fine: the KL coefficient and early stopping use all-rank means
        # (PPOModule.mean_over_ranks); rollouts under ZeRO-3 generate on gathered weights
    if stage.name in ("dpo", "ppo", "kto") and module.get("reference_model"):
        from llmlab.models import build_tokenizer
        from llmlab.stages.alignment import check_same_tokenizer, hf_dir

        check_same_tokenizer(hf_dir(str(module.reference_model)), build_tokenizer(cfg.model),
                             "stage.module.reference_model")


# --------------------------------------------------------------------------------------------------
# settings: pure-config rules, run before torch/lightning/transformers are imported (fail in ~1 s)
# --------------------------------------------------------------------------------------------------

DTYPES = (None, "auto", "float32", "bfloat16", "float16")
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


def check_model_settings(cfg) -> None:
    """model.init / dtype / trust_remote_code, and a local model directory's own config.json."""
    m = cfg.model
    if m.get("init") not in ("scratch", "pretrained"):
        raise ConfigError(f"model.init={m.get('init')!r}: use scratch or pretrained")
    if m.get("dtype") not in DTYPES:
        raise ConfigError(f"model.dtype={m.get('dtype')!r}: use one of float32, bfloat16, float16, auto or null")
    if m.get("trust_remote_code"):
        raise ConfigError("model.trust_remote_code=true would run Python code shipped with the model; llmlab "
                          "does not allow it: use a model transformers supports natively "
                          "(model.trust_remote_code=false)")
    config = local_config(m)
    if config is None:
        return
    where = f"model.pretrained={m.pretrained}"
    if config.get("auto_map"):
        raise ConfigError(f"{where}: its config.json maps to custom code (auto_map), which llmlab does not run "
                          f"(trust_remote_code stays off); use a model of a built-in transformers architecture")
    if not config.get("model_type"):
        raise ConfigError(f"{where}: config.json has no model_type; re-export the model with save_pretrained")


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
    positions = _model_positions(cfg.model)
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


# -------------------------------------------------------------------------------------------- the hub

def hub_fixes(name: str, setting: str, alternative: str | None = None) -> str:
    """How to use a hub model on a machine that cannot reach the hub: download it where the hub is
    reachable and pass the local directory as `setting` (or the `alternative`)."""
    text = (f"download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) and pass "
            f"{setting}=<local dir>")
    return f"{text}, or {alternative}" if alternative else text


def hub_cache_dir() -> Path:
    """Where huggingface_hub caches downloads (its own resolution of HF_HUB_CACHE / HF_HOME; a light import)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE).expanduser()


def in_hub_cache(name: str) -> bool:
    """True when a hub repo's files are already downloaded (any snapshot with a config or tokenizer file)."""
    snapshots = hub_cache_dir() / f"models--{name.replace('/', '--')}" / "snapshots"
    wanted = ("config.json", "tokenizer_config.json", "tokenizer.json")
    return snapshots.is_dir() and any((s / f).exists() for s in snapshots.iterdir() for f in wanted)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (HF_ENDPOINT respected), given up after `timeout` seconds
    (DNS included): without network this answers in seconds instead of a minute of download retries."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def check_hub(cfg) -> None:
    """A hub name (not a local dir) must be in the local cache or the hub reachable: else one line now,
    not 60 s of retries then a transformers traceback."""
    import os

    m = cfg.model
    names = []
    if m.get("init") == "pretrained" and m.get("pretrained"):
        names.append(("model.pretrained", str(m.pretrained)))
    # the tokenizer comes from model.tokenizer, else model.pretrained; a shapes-only dry run builds none
    shapes_only = cfg.get("dry_run") and m.get("init") == "scratch" and "vocab_size" in (m.get("config") or {})
    tok = m.get("tokenizer") or m.get("pretrained")
    if tok and tok != "builtin" and not shapes_only and str(tok) not in [n for _, n in names]:
        names.append(("model.tokenizer" if m.get("tokenizer") else "model.pretrained", str(tok)))
    hub = [(k, n) for k, n in names if not Path(n).expanduser().exists() and not n.startswith(("/", ".", "~"))]
    missing = [(k, n) for k, n in hub if not in_hub_cache(n)]
    if not missing:
        return
    setting, name = missing[0]
    weights = setting == "model.pretrained" and m.get("init") == "pretrained"
    fixes = (hub_fixes(name, "model.pretrained", "train from random weights with model.init=scratch") if weights
             else hub_fixes(name, "model.tokenizer", "use the byte-level model.tokenizer=builtin"))
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if offline:
        raise ConfigError(f"{setting}={name}: not in the local Hugging Face cache ({hub_cache_dir()}) and "
                          f"HF_HUB_OFFLINE=1; {fixes}")
    if not hub_reachable():
        raise ConfigError(f"{setting}={name}: the Hugging Face hub ({endpoint}) cannot be reached and the model is "
                          f"not in the local cache ({hub_cache_dir()}); {fixes}")


def hub_error(setting: str, name: str, err: BaseException) -> ConfigError:
    """A transformers/huggingface_hub load failure (typo'd repo, gated repo, missing files) as one line."""
    kind = type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else kind
    not_found = "is not a local folder and is not a valid model" in str(err)
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or not_found:
        return ConfigError(f"{setting}={name}: no such model on the Hugging Face hub (or it is private/gated); "
                           f"check the spelling (e.g. facebook/opt-1.3b), log in with `hf auth login` for gated "
                           f"models, or pass a local directory")
    if kind == "RevisionNotFoundError":
        return ConfigError(f"{setting}={name}: no such revision on the hub; check model.revision")
    return ConfigError(f"{setting}={name}: cannot load it ({kind}: {text}); pass a local directory with "
                       f"config.json and weights, or check the hub name")


def check_settings(cfg) -> None:
    """Every rule that needs the config alone (no torch, lightning or transformers): runs first, so a
    mistyped number or name fails in about a second."""
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")
    check_launcher(cfg)
    check_trainer(cfg)
    from llmlab.evaluation import check_eval_callbacks  # lm-eval during training: task names, hub

    check_eval_callbacks(cfg)
    check_precision(cfg)
    check_optimization(cfg)
    check_peft_numbers(cfg)
    check_stage_settings(cfg)
    check_preference_losses(cfg)
    check_data_settings(cfg)  # reads model.pretrained (a base model may be built to resolve it): late
    check_model_settings(cfg)
    check_model(cfg)
    check_hub(cfg)


def check_config(cfg) -> None:
    check_settings(cfg)
    check_launcher(cfg)
    check_precision(cfg)
    check_devices(cfg)
    check_run(cfg)  # strategy x trainer x precision x PEFT (llmlab/checks_strategy.py)
    check_model(cfg)
    check_peft(cfg)
    check_template(cfg)
    check_preference(cfg)
    if not cfg.dry_run:
        check_data(cfg)


def dry_run_report(cfg, module, info: dict, run_dir: Path) -> None:
    """`dry_run=true`: parameter counts and a memory estimate per device (llmlab/memory.py), no training."""
    from llmlab.memory import estimate_for_run, format_estimate

    memory = estimate_for_run(cfg, module)
    print(format_estimate(memory))
    summary = {**info, "status": "dry_run", "memory": memory, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return None
