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


def _architecture_on_meta(cfg):
    """The configured model built on the meta device (module names only: no memory, no weights), or
    None when its architecture cannot be known offline (a hub model without `config:` values)."""
    import torch

    from llmlab.models import architecture_config

    m, head = cfg.model, cfg.stage.get("head", "causal_lm")
    if m.get("config"):
        config = architecture_config(m, None, head)
    elif m.init == "pretrained" and Path(str(m.pretrained)).expanduser().is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(Path(str(m.pretrained)).expanduser()))
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
        true_dtype = {"bf16-true": "bfloat16", "16-true": "float16", "32-true": "float32"}.get(precision)
        if precision.endswith("-true") and storage not in (None, "uint8", "int8") and storage != true_dtype:
            raise ConfigError(f"precision={precision} casts float tensors, including 4-bit weights packed "
                              f"in peft.quantization.quant_storage={storage}: use quant_storage=null (uint8) "
                              f"or {true_dtype}")
        # qlora x strategy (ZeRO-3 needs float storage: set automatically) lives in check_strategy
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
    if stage.name in ("rm", "dpo") and data.source == "text" and not cfg.dry_run:
        chosen, rejected = data.get("chosen_field", "chosen"), data.get("rejected_field", "rejected")
        for f in ([data.train_files] if isinstance(data.train_files, str) else list(data.train_files or [])):
            record = _first_record(Path(str(f)).expanduser())
            missing = [n for n in (chosen, rejected) if record is not None and n not in record]
            if missing:
                raise ConfigError(f"stage={stage.name} needs preference pairs, but {f} has no field(s) {missing} "
                                  f"(fields: {sorted(record)}); set data.chosen_field / data.rejected_field")
    if stage.name == "ppo":
        if not module.get("reward_model") and not module.get("rule_reward"):
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
    if stage.name in ("dpo", "ppo") and module.get("reference_model"):
        from llmlab.models import build_tokenizer
        from llmlab.stages.alignment import check_same_tokenizer, hf_dir

        check_same_tokenizer(hf_dir(str(module.reference_model)), build_tokenizer(cfg.model),
                             "stage.module.reference_model")


def check_strategy(cfg) -> None:
    """strategy x trainer x precision x PEFT (llmlab/strategies.py: fsdp on CPU, cpu_bf16's precision
    and devices, QLoRA's 4-bit storage under DeepSpeed, ...); StrategyConfigError is a ConfigError."""
    from llmlab.strategies import check_run

    check_run(cfg)


def check_config(cfg) -> None:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")
    check_launcher(cfg)
    check_precision(cfg)
    check_devices(cfg)
    check_strategy(cfg)
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
