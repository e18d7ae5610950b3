"""The model and peft groups' rules, before any weights load.

model (`check_model`, config alone): model.init / pretrained / config / tokenizer / dtype / trust_remote_code /
attn_implementation, and a local model directory's own config.json (no custom code); `check_attention_device`:
attn_implementation x the device (flash_attention_2: CUDA + flash_attn; flex_attention trains on CUDA); `check_loss_chunking`:
stage.module.loss_chunk_tokens against the model type, compile and virtual tokens.

peft (`check_peft_settings`, config alone): the method name, r / alpha / dropout, a quantized base (qlora,
lora_int8: bitsandbytes installed, pretrained weights), PEFT x precision (QLoRA's compute dtype and 4-bit
storage dtype), virtual tokens x packing; `check_peft` (on the architecture built on the meta device, no
weights): target modules the model has (`check_peft_targets`). PEFT x strategy is strategy.py `check_run`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from llmlab.checks.settings import config_overrides, number
from llmlab.distributed.detect import uses_cpu
from llmlab.distributed.precision import half_dtype, weights_dtype
from llmlab.errors import ConfigError
from llmlab.models.peft import METHODS, PROMPT_LEARNING, missing_targets, target_modules


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


def architecture_values(model_cfg) -> dict:
    """The architecture that will be built: a local directory's config.json, else the model file's `config:`,
    with `model.config_overrides` over it."""
    return {**(local_config(model_cfg) or dict(model_cfg.get("config") or {})), **config_overrides(model_cfg)}


def _architecture_source(model_cfg, key: str) -> str:
    """Where an architecture value comes from, as the user would change it."""
    if key in config_overrides(model_cfg):
        return f"model.config_overrides.{key}"
    if local_config(model_cfg) is not None:
        return f"model.pretrained={model_cfg.pretrained}: config.json's {key}"
    return f"model.config.{key}"


# sizes every architecture that has them needs >= 1 (transformers builds some zero/negative ones on the meta device
# and fails later in a forward or at load; measured on transformers 5.25: llama builds hidden_size=0 and
# num_hidden_layers=-1, qwen2 divides by zero in its rotary setup)
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim", "n_embd", "n_layer", "n_head", "ffn_dim", "moe_intermediate_size",
                  "num_local_experts", "num_experts", "num_experts_per_tok")


def check_architecture_values(model_cfg) -> None:
    """The architecture's sizes, with the config alone: positive, heads that divide the width (unless head_dim
    is given), key/value heads that divide the query heads (grouped-query attention), top-k <= experts."""
    arch = architecture_values(model_cfg)
    for key in POSITIVE_SIZES:
        value = arch.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{_architecture_source(model_cfg, key)}={value!r}: must be a positive integer")
    hidden, heads = arch.get("hidden_size", arch.get("n_embd")), arch.get("num_attention_heads", arch.get("n_head"))
    if hidden and heads and arch.get("head_dim") is None and hidden % heads:
        fits = [h for h in range(heads, 0, -1) if hidden % h == 0][0]
        raise ConfigError(f"{_architecture_source(model_cfg, 'num_attention_heads')}={heads} does not divide "
                          f"hidden_size={hidden} (each head gets hidden_size / num_attention_heads features): use "
                          f"num_attention_heads={fits} or a hidden_size that is a multiple of {heads}")
    kv = arch.get("num_key_value_heads")
    if heads and kv and heads % kv:
        fits = [h for h in range(kv, 0, -1) if heads % h == 0][0]
        raise ConfigError(f"{_architecture_source(model_cfg, 'num_key_value_heads')}={kv} does not divide "
                          f"num_attention_heads={heads} (each key/value head serves num_attention_heads / "
                          f"num_key_value_heads query heads): use num_key_value_heads={fits}")
    experts, top_k = arch.get("num_local_experts", arch.get("num_experts")), arch.get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise ConfigError(f"{_architecture_source(model_cfg, 'num_experts_per_tok')}={top_k}: each token cannot be "
                          f"routed to more experts than the {experts} there are; use num_experts_per_tok<={experts}")


def check_weights(model_cfg) -> None:
    """A local model directory's weight files, before anything loads them: present (safetensors or
    pytorch_model*.bin, or the shards its index names), and each safetensors file whole (its 8-byte header
    length, a JSON header, and the data the header places inside the file)."""
    import zipfile

    path = local_model_dir(model_cfg)
    if path is None or not (path / "config.json").is_file():
        return
    where = f"model.pretrained={path}"
    fix = "copy the model again or re-export it with save_pretrained"
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    for index in sorted(path.glob("*.index.json")):
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: {index.name} is not a weight index (JSON with a weight_map): {err}; "
                              f"{fix}") from None
        missing = sorted(n for n in named if not (path / n).is_file())
        if missing:
            raise ConfigError(f"{where}: {index.name} names {len(missing)} weight file(s) not in the directory "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {fix}")
    if not files:
        raise ConfigError(f"{where}: config.json but no weights (model.safetensors or pytorch_model.bin); {fix}, "
                          f"or use model.init=scratch to train this architecture from random weights")
    for f in files:
        size = f.stat().st_size
        if f.suffix == ".bin":  # torch.save's zip: a truncated file has lost its central directory, at the end
            if not zipfile.is_zipfile(f):
                raise ConfigError(f"{where}: {f.name} is not a whole torch checkpoint (truncated or not a zip "
                                  f"archive, {size} bytes); {fix}")
            continue
        with f.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or 8 + length > size:
                raise ConfigError(f"{where}: {f.name} is truncated ({size} bytes, shorter than its header "
                                  f"length says); {fix}")
            try:
                header = json.loads(fh.read(length))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                raise ConfigError(f"{where}: {f.name} is corrupt (its header is not safetensors JSON); "
                                  f"{fix}") from None
        if 8 + length + end > size:
            raise ConfigError(f"{where}: {f.name} is truncated: {size} bytes, its header places tensors up to "
                              f"byte {8 + length + end}; {fix}")


def model_positions(model_cfg) -> int | None:
    """Max positions of the architecture that will be built, without loading weights or the network.

    A local directory's config.json wins (it is what from_pretrained loads: `model=gpt2
    model.pretrained=<a llama dir>` is a llama); else the `config:` values of the model file.
    """
    arch = architecture_values(model_cfg)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(arch.get(key), int) and arch[key] > 0:
            return arch[key]
    return None


def _architecture_on_meta(cfg):
    """The configured model built on the meta device (module names only: no memory, no weights), or
    None when its architecture cannot be known offline (a hub model without `config:` values)."""
    import torch
    from huggingface_hub.errors import StrictDataclassError

    from llmlab.models.build import architecture_config

    m, head = cfg.model, cfg.stage.get("head", "causal_lm")
    local = local_model_dir(m)
    where = f"model.pretrained={m.pretrained}" if local is not None else f"model={m.name}"
    try:
        if local is not None:  # what from_pretrained will load, whatever the yaml `config:` says
            from transformers import AutoConfig

            config, unused = AutoConfig.from_pretrained(str(local), trust_remote_code=False, return_unused_kwargs=True,
                                                        **config_overrides(m))
            if unused:  # from_pretrained would pass them on to the model's constructor: a TypeError there
                raise ConfigError(f"model.config_overrides: {sorted(unused)} are not settings of a "
                                  f"{config.model_type} config; drop them")
        elif m.get("config"):
            config = architecture_config(m, None, head)
        else:
            return None
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, TypeError, ZeroDivisionError, StrictDataclassError) as err:
        # transformers' own validation (ValueError; a config class's validators raise huggingface_hub's
        # StrictDataclassError, not a ValueError), or a size it does arithmetic with before validating it
        # (TypeError/ZeroDivisionError); check_architecture_values names the common ones first
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__  # the validator's own sentence comes last
        raise ConfigError(f"{where}: transformers cannot build this architecture ({reason}); fix the value in "
                          f"{'its config.json or model.config_overrides' if local is not None else 'model.config'}"
                          ) from None


def _check_quantized_base(cfg, method: str, kind: str, alternative: str) -> None:
    """A bitsandbytes-quantized base (qlora, lora_int8): the package is there and the weights are pretrained."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"peft={method} needs bitsandbytes ({kind}): pip install 'llmlab[bnb]' "
                          "(bitsandbytes>=0.45), or use peft=lora")
    if cfg.model.init != "pretrained" and not cfg.dry_run:
        raise ConfigError(f"peft={method} quantizes pretrained weights as they load, but model.init="
                          f"{cfg.model.init}; use model.init=pretrained ({alternative})")


DTYPES = (None, "auto", "float32", "bfloat16", "float16")
# model.attn_implementation, as transformers names them (null: transformers' default, sdpa where the architecture
# has it); how each takes a packed batch's document boundaries: llmlab/models/attention.py
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
INITS = ("scratch", "pretrained")


def check_model(cfg) -> None:
    """model.init / pretrained / config / tokenizer / dtype / trust_remote_code, and a local model directory's
    own config.json."""
    m = cfg.model
    if m.get("init") not in INITS:
        raise ConfigError(f"model.init={m.get('init')!r}: use scratch or pretrained")
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
    attn = m.get("attn_implementation")
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={attn!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)} or null "
                          f"(transformers' default), e.g. model.attn_implementation=sdpa")
    if m.get("dtype") not in DTYPES:
        raise ConfigError(f"model.dtype={m.get('dtype')!r}: use one of float32, bfloat16, float16, auto or null")
    if m.get("trust_remote_code"):
        raise ConfigError("model.trust_remote_code=true would run Python code shipped with the model; llmlab "
                          "does not allow it: use a model transformers supports natively "
                          "(model.trust_remote_code=false)")
    config = local_config(m)
    if config is not None:
        where = f"model.pretrained={m.pretrained}"
        if config.get("auto_map"):
            raise ConfigError(f"{where}: its config.json maps to custom code (auto_map), which llmlab does not run "
                              f"(trust_remote_code stays off); use a model of a built-in transformers architecture")
        if not config.get("model_type"):
            raise ConfigError(f"{where}: config.json has no model_type; re-export the model with save_pretrained")
        check_weights(m)
    check_architecture_values(m)


def check_architecture(cfg):
    """The architecture built on the meta device (no memory, no weights), or None when it cannot be known
    offline; transformers' refusal as one line. Its router settings (`check_router_aux`)."""
    model = _architecture_on_meta(cfg)
    if model is not None:
        check_router_aux(cfg, model)
    return model


# stages whose policy forwards add an MoE model's router load-balancing loss (stages.common.add_router_aux)
ROUTER_AUX_STAGES = ("pretrain", "sft", "dpo", "orpo", "simpo", "kto")


def check_router_aux(cfg, model) -> None:
    """An MoE config that asks for the router's load-balancing loss (output_router_logits with
    router_aux_loss_coef > 0): the stage adds it, and the model's head can be run apart from the backbone
    (stages.common._backbone); prefix/prompt tuning run PEFT's own forward, which would not give the loss."""
    config = model.config
    if not getattr(config, "output_router_logits", False) or not getattr(config, "router_aux_loss_coef", 0):
        return
    setting = "output_router_logits=true (the router's load-balancing loss)"
    if config.model_type not in HEAD_APART_MODEL_TYPES:
        raise ConfigError(f"{setting}: llmlab computes it for {', '.join(HEAD_APART_MODEL_TYPES)}, not model type "
                          f"{config.model_type!r}; set +model.config_overrides.output_router_logits=false")
    method = (cfg.get("peft") or {}).get("method")
    if method in PROMPT_LEARNING:
        raise ConfigError(f"{setting} with peft={method}: PEFT's virtual-token forward does not give the router "
                          f"logits; use peft=lora or +model.config_overrides.output_router_logits=false")
    if cfg.stage.name not in ROUTER_AUX_STAGES:
        raise ConfigError(f"{setting}: stage={cfg.stage.name} does not add it to its loss (only "
                          f"{', '.join(ROUTER_AUX_STAGES)} do); set +model.config_overrides.output_router_logits=false")


def check_attention_device(cfg, cuda_available: bool | None = None, flash_attn_installed: bool | None = None) -> None:
    """model.attn_implementation x the device the run trains on (trainer.accelerator resolved): FlashAttention 2 is
    CUDA kernels from the flash_attn package; flex attention trains on CUDA only (torch 2.13 has no CPU backward:
    `NotImplementedError: FlexAttention does not support backward on CPU`, after data and model are built)."""
    attn = cfg.model.get("attn_implementation")
    if attn not in ("flash_attention_2", "flex_attention"):
        return
    on_cpu = uses_cpu(cfg.trainer.get("accelerator"), cuda_available)
    if attn == "flash_attention_2":
        if on_cpu:
            raise ConfigError(f"model.attn_implementation=flash_attention_2 runs on CUDA GPUs only, and this run is on "
                              f"the CPU (trainer.accelerator={cfg.trainer.get('accelerator')}): use "
                              f"model.attn_implementation=sdpa (llmlab runs packed rows per document there)")
        if flash_attn_installed is None:
            flash_attn_installed = importlib.util.find_spec("flash_attn") is not None
        if not flash_attn_installed:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash_attn package, not installed "
                              "here: pip install flash-attn --no-build-isolation, or use "
                              "model.attn_implementation=sdpa (or flex_attention)")
    elif on_cpu and not cfg.get("dry_run"):  # a dry run builds the model, never a backward
        raise ConfigError("model.attn_implementation=flex_attention cannot train on the CPU (torch has no CPU backward "
                          "for it: 'FlexAttention does not support backward on CPU'): use "
                          "model.attn_implementation=sdpa, or train on a CUDA GPU")


# Model types whose causal-LM forward is exactly `lm_head(backbone(...).last_hidden_state)`: nothing between
# (no logit soft-capping as Gemma 2, no logit scaling as Cohere/Granite), so the head can be applied apart
# (`stage.module.loss_chunk_tokens`, llmlab.stages.common.forward_hidden; an MoE model's router load-balancing loss,
# which needs the backbone's router logits without transformers' own aux computation: stages.common._backbone).
HEAD_APART_MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "mixtral",
                          "qwen3_moe")


def check_loss_chunking(cfg) -> None:
    """`stage.module.loss_chunk_tokens` (pretrain, sft): a positive count, on a model whose head can be applied
    apart from its backbone (HEAD_APART_MODEL_TYPES), without compile or virtual tokens."""
    chunk = (cfg.stage.get("module") or {}).get("loss_chunk_tokens")
    if chunk is None:
        return
    setting = f"stage.module.loss_chunk_tokens={chunk!r}"
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"{setting}: give a number of target tokens per chunk (e.g. 1024), or null for the "
                          f"full logits")
    if cfg.get("compile"):
        raise ConfigError(f"{setting} with compile=true: compile covers the model's whole forward, which the "
                          f"chunked loss does not call (it runs the backbone and the head apart); drop one of them")
    method = (cfg.get("peft") or {}).get("method")
    if method in ("prefix", "prompt"):
        raise ConfigError(f"{setting} with peft={method}: PEFT runs the virtual tokens inside its own forward; "
                          f"set stage.module.loss_chunk_tokens=null")
    model_type = architecture_values(cfg.model).get("model_type")
    if model_type is not None and model_type not in HEAD_APART_MODEL_TYPES:
        raise ConfigError(f"{setting}: model type {model_type!r} is not one whose output layer can be applied "
                          f"apart ({', '.join(HEAD_APART_MODEL_TYPES)}); set stage.module.loss_chunk_tokens=null")


def check_peft_settings(cfg) -> None:
    """The peft group with the config alone: method name, LoRA numbers (PEFT itself fails late with a
    traceback), a quantized base, PEFT x precision, virtual tokens x packing."""
    p = cfg.get("peft") or {}
    method = p.get("method")
    if method not in METHODS:
        raise ConfigError(f"peft.method={method!r}: use one of {METHODS} (peft=<name>)")
    if method == "none":
        return
    if "r" in p and (isinstance(p.r, bool) or not isinstance(p.r, int) or p.r < 1):
        raise ConfigError(f"peft.r={p.r!r}: the LoRA rank must be an integer >= 1, e.g. peft.r=8 (or peft=none "
                          f"for full fine-tuning)")
    if "alpha" in p and number(p.alpha, "peft.alpha", "16") <= 0:
        raise ConfigError(f"peft.alpha={p.alpha}: must be > 0 (the update is scaled by alpha/r), e.g. peft.alpha=16")
    if "dropout" in p and not 0 <= number(p.dropout, "peft.dropout", "0.05") < 1:
        raise ConfigError(f"peft.dropout={p.dropout}: give a probability in [0, 1)")
    if method == "qlora":
        _check_quantized_base(cfg, "qlora", "4-bit NF4",
                              "or peft=lora; dry_run=true estimates QLoRA on an init=scratch architecture")
        q = p.quantization
        precision = str(cfg.trainer.precision)
        compute = str(q.compute_dtype)
        if half_dtype(precision) == "float16" and compute != "float16":
            raise ConfigError(f"peft=qlora computes in peft.quantization.compute_dtype={compute} but "
                              f"precision={precision} is fp16: set peft.quantization.compute_dtype=float16 "
                              f"or precision=bf16-mixed / bf16-true")
        if half_dtype(precision) == "bfloat16" and compute == "float16":
            raise ConfigError(f"peft=qlora with precision={precision} needs "
                              f"peft.quantization.compute_dtype=bfloat16 (got float16)")
        storage = q.get("quant_storage")
        true_dtype = weights_dtype(precision)
        if precision.endswith("-true") and storage not in (None, "uint8", "int8") and storage != true_dtype:
            raise ConfigError(f"precision={precision} casts float tensors, including 4-bit weights packed "
                              f"in peft.quantization.quant_storage={storage}: use quant_storage=null (uint8) "
                              f"or {true_dtype}")
    if method == "lora_int8":
        _check_quantized_base(cfg, "lora_int8", "LLM.int8", "or peft=lora")
    if p.get("target_parameters"):
        setting = f"peft.target_parameters={list(p.target_parameters)}"
        if method != "lora":
            raise ConfigError(f"{setting}: adapters on fused parameters (MoE experts) are supported with peft=lora "
                              f"only; use peft=lora or peft.target_parameters=null")
        if number(p.get("dropout", 0), "peft.dropout", "0") != 0:
            raise ConfigError(f"{setting} with peft.dropout={p.dropout}: PEFT adapts fused parameters without "
                              f"dropout only; set peft.dropout=0")
    if method in PROMPT_LEARNING:
        if cfg.stage.name == "pretrain" and cfg.data.get("packing", "document") == "document":
            raise ConfigError(f"peft={method} prepends virtual tokens, which the block-diagonal masks of "
                              f"packed documents cannot take: set data.packing=concat with stage=pretrain")
        if cfg.data.get("pack_examples"):
            raise ConfigError(f"peft={method} prepends virtual tokens, which packed examples' masks cannot "
                              f"take: set data.pack_examples=false")


def check_peft(cfg, model=None) -> None:
    """The peft group against the architecture that will be built (on the meta device: no memory, no
    weights; `check_architecture`'s when given): the modules it targets exist (`check_peft_targets`)."""
    method = cfg.peft.method
    if method == "none" or method in PROMPT_LEARNING:
        return
    model = model if model is not None else _architecture_on_meta(cfg)
    if model is not None:
        check_peft_targets(cfg.peft, model, cfg.model.name)


def check_peft_targets(peft_cfg, model, model_name: str) -> None:
    """ConfigError when the method's target modules are not in this architecture (none by default for its
    type, or named ones it does not have). `model` may live on the meta device: only module names and the
    config are read."""
    method = peft_cfg.method
    model_type = model.config.model_type
    head = model.get_output_embeddings()  # not a target to suggest: PEFT's all-linear leaves it out too
    linear_names = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and m is not head]
    for key in ("target_modules", "feedforward_modules") if method == "ia3" else ("target_modules",):
        targets = target_modules(peft_cfg, model_type, key)
        if targets is None:
            raise ConfigError(f"peft={method}: PEFT has no default peft.{key} for model type {model_type!r} "
                              f"(model={model_name}); set peft.{key}=[...] from its linear layers "
                              f"{sorted({n.rsplit('.', 1)[-1] for n in linear_names})}")
        missing = missing_targets(linear_names, targets)
        if missing:
            raise ConfigError(f"peft.{key}={targets}: {missing} match no linear layer of model={model_name} "
                              f"({model_type}); its layers are named "
                              f"{sorted({n.rsplit('.', 1)[-1] for n in linear_names})}")
    wanted = list(peft_cfg.get("target_parameters") or [])
    if wanted:
        names = [n for n, _ in model.named_parameters()]
        missing = missing_targets(names, wanted)
        if missing:
            fused = sorted({n.split(".layers.0.", 1)[-1] for n, p in model.named_parameters()
                            if ".layers.0." in n and p.dim() == 3})
            raise ConfigError(f"peft.target_parameters={wanted}: {missing} match no parameter of model={model_name} "
                              f"({model_type}); its fused (3-D) parameters are {fused or 'none'}")
