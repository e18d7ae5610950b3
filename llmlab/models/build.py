"""Build tokenizers and models from a `model` config node.

One builder for every size: the tiny test model and OPT-1.3B differ only in their config numbers
(`conf/model/*.yaml`). `init: scratch` builds random weights from `config:` (architecture as data);
`init: pretrained` calls `from_pretrained` on `pretrained:` (a hub name or a local directory). Either way
`config_overrides:` (optional) sets config values over the architecture's own, e.g.
`+model.config_overrides.output_router_logits=true` (an MoE model's router load-balancing loss in training).
"""
from __future__ import annotations

import math

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from llmlab.checks.hub import hub_error
from llmlab.checks.settings import config_overrides
from llmlab.data.tokenizer import builtin_tokenizer
from llmlab.errors import ConfigError
from llmlab.models.peft import transformers_model
from llmlab.nodes import to_plain

HEADS = ("causal_lm", "sequence_classification")


def build_tokenizer(model_cfg):
    """`tokenizer: builtin` -> the byte-level tokenizer; a name/path -> AutoTokenizer; null -> `pretrained`."""
    source = model_cfg.get("tokenizer") or model_cfg.get("pretrained")
    if source == "builtin":
        return builtin_tokenizer()
    setting = "model.tokenizer" if model_cfg.get("tokenizer") else "model.pretrained"
    try:
        # trust_remote_code stays off whatever the config says: code shipped with a model never runs
        tok = AutoTokenizer.from_pretrained(source, revision=model_cfg.get("revision"), trust_remote_code=False)
    except (OSError, ValueError) as err:  # a typo'd hub name, a dir without tokenizer files
        raise hub_error(setting, source, err) from None
    if tok.pad_token is None:  # GPT-2/Llama ship without one; padding is masked everywhere, so EOS is safe
        tok.pad_token = tok.eos_token
    return tok


def architecture_config(model_cfg, tokenizer=None, head: str = "causal_lm"):
    """The transformers config for `init: scratch` (vocab from the tokenizer unless given)."""
    kwargs = {**(to_plain(model_cfg.config) or {}), **config_overrides(model_cfg)}
    model_type = kwargs.pop("model_type")
    if "vocab_size" not in kwargs and tokenizer is not None:
        kwargs["vocab_size"] = len(tokenizer)
    if tokenizer is not None:
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            kwargs.setdefault(key, getattr(tokenizer, key))
    if head == "sequence_classification":
        kwargs["num_labels"] = 1
    return AutoConfig.for_model(model_type, **kwargs)


def torch_dtype(name: str | None):
    return None if name in (None, "auto") else getattr(torch, name)


def build_model(model_cfg, tokenizer=None, head: str = "causal_lm", quantization_config=None):
    """A causal LM (`head=causal_lm`) or a one-output reward model (`head=sequence_classification`)."""
    assert head in HEADS, head
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    dtype = torch_dtype(model_cfg.get("dtype"))
    # model.attn_implementation: null leaves transformers' default (sdpa where the architecture has it)
    attn = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.get("attn_implementation") else {}
    if model_cfg.init == "scratch":
        config = architecture_config(model_cfg, tokenizer, head)
        if quantization_config is not None:
            raise ValueError("quantization needs init=pretrained weights to quantize")
        try:
            model = auto.from_config(config, **({"dtype": dtype} if dtype else {}), **attn)
        except (ValueError, ImportError) as err:  # the architecture lacks that implementation; flash_attn absent
            if not attn:
                raise
            raise attn_error(model_cfg, err) from None
    else:
        extra = {"num_labels": 1, **attn} if head == "sequence_classification" else dict(attn)
        try:
            model = auto.from_pretrained(
                model_cfg.pretrained,
                revision=model_cfg.get("revision"),
                trust_remote_code=False,  # whatever the config says: code shipped with a model never runs
                dtype=dtype,
                quantization_config=quantization_config,
                **config_overrides(model_cfg),  # set on the loaded config.json (transformers' kwargs rule)
                **extra,
            )
        except OSError as err:  # a typo'd hub name, missing weights: one line naming the setting
            raise hub_error("model.pretrained", str(model_cfg.pretrained), err) from None
        except (ValueError, ImportError) as err:
            if not attn or not any(w in str(err).lower() for w in ("attention", "flash")):
                raise
            raise attn_error(model_cfg, err) from None
    if head == "sequence_classification" and tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # needed to find each row's last token
    return model


def attn_error(model_cfg, err: Exception) -> ConfigError:
    """transformers' refusal of `model.attn_implementation` for this architecture (GPT-2 has no flex attention) or
    this machine, as one line naming the setting."""
    first = str(err).strip().splitlines()[0].split(". Please")[0]
    return ConfigError(f"model.attn_implementation={model_cfg.attn_implementation}: {first}; use "
                       f"model.attn_implementation=sdpa (or null: transformers' default)")


def _weights_in(p: torch.nn.Parameter) -> int:
    """How many weights a parameter represents. A bitsandbytes 4-bit parameter stores two weights per
    byte in a packed tensor whose dtype is `quant_storage` (uint8, or bf16/fp32 under ZeRO-3), so its
    numel is not its size: the quant state records the original shape. A ZeRO-3 partitioned parameter
    keeps its full size in `ds_numel`."""
    if p.__class__.__name__ == "Params4bit":
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else p.numel() * p.element_size() * 2
    return int(getattr(p, "ds_numel", p.numel()))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) weights of the model as designed: 4-bit weights count as the weights they
    represent, so a QLoRA model reports its unquantized model's count (`param_bytes` says the storage)."""
    total = trainable = 0
    for p in model.parameters():
        n = _weights_in(p)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters occupy as held now: each tensor's storage (4-bit weights packed) plus the
    4-bit quantization constants (absmax per block, the nested ones and their code books)."""
    total, seen = 0, set()

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += int(getattr(t, "ds_numel", t.numel())) * t.element_size()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None) if p.__class__.__name__ == "Params4bit" else None
        for state in (qs, getattr(qs, "state2", None)):
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
    return total


def compile_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Compile the transformers model's forward in place (`compile: true`; inductor): the module it compiled.

    `nn.Module.compile()` wraps only the module's `__call__`: parameters, buffers and state_dict keys stay
    the eager model's, so checkpoints, resume and the `hf/` export are unchanged (`torch.compile(model)`
    would return an OptimizedModule whose keys gain an `_orig_mod.` prefix). Under PEFT the inner
    transformers model is compiled: PEFT's wrappers call it through `__call__` and its adapter layers are
    traced into its graph, while the PeftModel's own methods (`disable_adapter`, `save_pretrained`) stay
    Python. Each new input shape or grad mode compiles at its first forward (validation's no-grad graph,
    then the training one; inductor caches them on disk across runs). Generation runs eager
    (`generation.eager_generation`); a frozen reference copied when the stage was built stays eager.
    """
    inner = transformers_model(model)
    inner.compile(backend="inductor")
    return inner
