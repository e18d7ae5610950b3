"""PEFT as a function on a model: `apply_peft(model, cfg, head)`; `peft=none` returns the model unchanged.

Methods (conf/peft/<method>.yaml, `method:` names the one in use):
- lora: low-rank updates W + (alpha/r) B A on `target_modules` (Hu et al. 2021)
- dora: LoRA with a learned magnitude per output (Liu et al. 2024), `use_dora=True` in PEFT
- qlora: LoRA on a base loaded 4-bit NF4 with double quantization and bf16 compute (Dettmers et al.
  2023); the quantization happens at load time (`quantization_config`), so it needs init=pretrained
- lora_int8: LoRA on a base loaded in 8 bit (bitsandbytes LLM.int8, Dettmers et al. 2022: int8 weights with
  per-row scales, outlier features above `threshold` in fp16), as the course's PPO / fine-tuning chapters
  load their bases; the quantization happens at load time, so it needs init=pretrained
- ia3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022)
- prefix: trained key/value prefixes in every layer (Li & Liang 2021)
- prompt: trained soft-prompt embeddings prepended to the input (Lester et al. 2021)

`head=sequence_classification` (reward models) uses PEFT's SEQ_CLS task type, which keeps the new
score head fully trainable (`modules_to_save`). Target modules default per architecture (`target_modules`:
llmlab's own choices in `DEFAULT_TARGETS`, then PEFT's per-architecture table, then, for the LoRA family,
`all-linear`). The rules on the peft settings (method, numbers, PEFT x precision, target modules the model
has) are llmlab/checks/model.py; PEFT x strategy is llmlab/checks/strategy.py.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from llmlab.distributed.detect import is_zero3
from llmlab.distributed.precision import parameter_dtype

METHODS = ("none", "lora", "dora", "qlora", "lora_int8", "ia3", "prefix", "prompt")
QUANTIZED_BASE = ("qlora", "lora_int8")  # the base is quantized as it loads (bitsandbytes)
PROMPT_LEARNING = ("prefix", "prompt")  # prepend virtual tokens: attention masks must be 2-D

# model_type -> llmlab's own default modules, looked up before PEFT's table (peft.utils.constants): the course's
# choice for OPT/GPT-2 (the same as PEFT's), and (IA)^3 on keys, values and the FF output as the paper does
# (PEFT's OPT entry scales queries instead of values)
DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "lora": {
        "gpt2": ["c_attn"],
        "opt": ["q_proj", "v_proj"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "gpt_neox": ["query_key_value"],
        "gptj": ["q_proj", "v_proj"],
        "bloom": ["query_key_value"],
        "falcon": ["query_key_value"],
    },
    "ia3": {
        "gpt2": ["c_attn", "mlp.c_proj"],
        "opt": ["k_proj", "v_proj", "fc2"],
        "llama": ["k_proj", "v_proj", "down_proj"],
        "mistral": ["k_proj", "v_proj", "down_proj"],
    },
    "ia3_feedforward": {
        "gpt2": ["mlp.c_proj"],
        "opt": ["fc2"],
        "llama": ["down_proj"],
        "mistral": ["down_proj"],
    },
}


def import_peft():
    """Import `peft`. It imports bitsandbytes when installed, whose CPU backend logs a warning about
    an optional `kernels` package (the built-in fallback kernel works); keep that out of the logs."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import peft  # lazy: heavy, pulls bitsandbytes (a warning on CPU) and torchao

    return peft


def _method_family(method: str) -> str:
    return "lora" if method in ("lora", "dora", "qlora", "lora_int8") else method


def quantization_config(peft_cfg, precision: str | None = None):
    """A transformers `BitsAndBytesConfig` when the PEFT method quantizes the base (qlora: 4-bit NF4;
    lora_int8: LLM.int8), else None.

    `bnb_4bit_quant_storage` (peft.quantization.quant_storage) packs the 4-bit weights into a float
    dtype: bfloat16 lets DeepSpeed ZeRO-3 partition them like ordinary bf16 parameters.
    """
    if peft_cfg.method not in QUANTIZED_BASE:
        return None
    # lazy (torch, transformers here and below): llmlab.checks, .export and .generate import this module
    # before torch loads
    import torch
    from transformers import BitsAndBytesConfig

    if peft_cfg.method == "lora_int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(peft_cfg.quantization.threshold))

    q = peft_cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=bool(q.double_quant),
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.get("quant_storage") or "uint8"),
    )


ALL_LINEAR = "all-linear"  # PEFT's own name: every nn.Linear (and bnb 4/8-bit Linear) but the output layer


def peft_table(kind: str) -> dict[str, list[str]]:
    """PEFT's per-architecture default modules: kind lora | ia3 | ia3_feedforward."""
    from peft.utils import constants

    name = {"lora": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
            "ia3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
            "ia3_feedforward": "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"}[kind]
    return getattr(constants, name, {})


def target_modules(peft_cfg, model_type: str, key: str = "target_modules") -> list[str] | str | None:
    """The configured modules, or the default for this architecture (None when there is none).

    Default, in order: llmlab's `DEFAULT_TARGETS` (the course's OPT recipe), PEFT's own per-architecture table
    (what `peft.LoraConfig(target_modules=None)` would pick: q_proj/v_proj on Llama, Qwen, Gemma, Mistral...),
    and for the LoRA family on an architecture PEFT has no entry for (phi3's fused qkv_proj, qwen3_moe, olmo2,
    granite, smollm3, ...) `all-linear`, which needs no module names (conf/peft/lora.yaml says why).
    (IA)^3 has no such fallback (which layers are feed-forward is per architecture): None.
    """
    given = peft_cfg.get(key)
    if given is not None:
        return given if isinstance(given, str) else list(given)
    family = _method_family(peft_cfg.method)
    kind = "ia3_feedforward" if key == "feedforward_modules" else family
    found = DEFAULT_TARGETS[kind].get(model_type) or peft_table(kind).get(model_type)
    if found is not None:
        return list(found)
    return ALL_LINEAR if family == "lora" else None


def _module_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the module's full name equals it or ends with '.' + it."""
    return name == target or name.endswith("." + target)


def missing_targets(module_names: list[str], targets: list[str] | str) -> list[str]:
    """Entries of `targets` that match no module (a str is a regex over full names, as in PEFT)."""
    if targets == ALL_LINEAR:
        return [] if module_names else [targets]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in module_names) else [targets]
    return [t for t in targets if not any(_module_matches(n, t) for n in module_names)]


def peft_config(peft_cfg, model_type: str, head: str = "causal_lm"):
    """The `peft.PeftConfig` for a `peft` config node and an architecture."""
    peft = import_peft()

    method = peft_cfg.method
    task_type = "CAUSAL_LM" if head == "causal_lm" else "SEQ_CLS"
    modules_to_save = list(peft_cfg.modules_to_save) if peft_cfg.get("modules_to_save") else None
    if _method_family(method) == "lora":
        return peft.LoraConfig(
            r=peft_cfg.r,
            lora_alpha=peft_cfg.alpha,
            lora_dropout=peft_cfg.dropout,
            bias=peft_cfg.bias,
            target_modules=target_modules(peft_cfg, model_type),
            modules_to_save=modules_to_save,
            # fused 3-D parameters (an MoE layer's experts): opt-in, conf/peft/lora.yaml says why
            target_parameters=list(peft_cfg.target_parameters) if peft_cfg.get("target_parameters") else None,
            use_dora=method == "dora" or bool(peft_cfg.get("use_dora", False)),
            fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
            task_type=task_type,
        )
    if method == "ia3":
        return peft.IA3Config(
            target_modules=target_modules(peft_cfg, model_type),
            feedforward_modules=target_modules(peft_cfg, model_type, "feedforward_modules"),
            modules_to_save=modules_to_save,
            fan_in_fan_out=model_type == "gpt2",
            task_type=task_type,
        )
    if method == "prefix":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=peft_cfg.num_virtual_tokens,
            prefix_projection=bool(peft_cfg.prefix_projection),
            encoder_hidden_size=peft_cfg.get("encoder_hidden_size"),
            task_type=task_type,
        )
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens, task_type=task_type)
    raise ValueError(f"peft.method={method!r}: use one of {METHODS}")


def apply_peft(model, peft_cfg, head: str = "causal_lm"):
    """Wrap `model` with the configured PEFT method (base frozen, adapters trainable).

    qlora first runs `prepare_model_for_kbit_training` (norms upcast to fp32, inputs require grad,
    optional gradient checkpointing), as the QLoRA recipe does.
    """
    method = peft_cfg.method
    if method == "none":
        return model
    peft = import_peft()

    if method in QUANTIZED_BASE and next(model.parameters()).is_meta:
        pass  # dry run on the meta device: shapes only, counted as LoRA on a 4-bit base (llmlab/distributed/memory.py)
    elif method in QUANTIZED_BASE:
        bits = 4 if method == "qlora" else 8
        if not getattr(model, f"is_loaded_in_{bits}bit", False):
            raise ValueError(f"peft={method} needs a model loaded in {bits} bit (quantization_config from "
                             "llmlab.models.peft.quantization_config)")
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(peft_cfg.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "qlora" and peft_cfg.get("upcast", "norms") == "norms":
            _frozen_matrices_to_compute_dtype(model, peft_cfg)
    config = peft_config(peft_cfg, model.config.model_type, head)
    # prompt/prefix tuning configs have no target_modules
    if getattr(config, "target_modules", None) == ALL_LINEAR and peft_cfg.get("target_modules") is None:
        config.target_modules = linear_layer_names(model)  # llmlab's fallback: see linear_layer_names
    return peft.get_peft_model(model, config)


def linear_layer_names(model) -> set[str]:
    """The names (last component) of the model's nn.Linear layers (4-bit / 8-bit ones included), output layer
    and classification head excluded: what llmlab's `all-linear` fallback adapts.

    PEFT's own `all-linear` also wraps parameters that are not nn.Linear on transformers-5 MoE blocks (the
    fused expert tensors and the router, as `target_parameters`), which PEFT then refuses with any
    lora_dropout but 0 and which put adapters on the routing decision; by names, the fallback adapts the
    attention and dense projections only. `peft.target_modules=all-linear` set explicitly is PEFT's rule."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and name.rsplit(".", 1)[-1] not in ("score", "classifier")}


def _frozen_matrices_to_compute_dtype(model, peft_cfg) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast for frozen matrices (embeddings, untied
    heads): keep only 1-D parameters (norms, biases) in fp32, as the course's QLoRA recipe does.

    A frozen fp32 embedding gains nothing in training, costs 2x its bf16 size, and under bf16 autocast
    its tied output head is cast to bf16 again and that copy saved for backward: on OPT-1.3B (seq 256)
    this is ~0.6 GB of a ~2.3 GB step.
    """
    import torch  # lazy: see quantization_config

    dtype = getattr(torch, peft_cfg.quantization.compute_dtype)
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = model.get_output_embeddings()  # causal LM head (a reward model's score head is trained: left alone)
    if head is not None:
        matrices.append(head.weight)
    for p in matrices:
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
    if head is not None and head.weight.dtype == dtype:
        _head_computes_in_weight_dtype(head)


def _head_computes_in_weight_dtype(head) -> None:
    """Without autocast (precision=32), run the compute-dtype output layer as bitsandbytes runs a 4-bit layer:
    input cast to its weight dtype, output cast back to the input's dtype.

    Needed where the residual stream is fp32 at the head: Llama-style RMSNorms return `weight * x`, so the
    fp32 norms prepare_model_for_kbit_training leaves make the final hidden states fp32, while the frozen head
    is held in the compute dtype (bf16): `F.linear` refused the mix ("expected m1 and m2 to have the same
    dtype"). GPT-2/OPT's LayerNorms keep the bf16 of their input, so they never met it. Under autocast
    (bf16-mixed) the hooks step aside: autocast casts both, and the logits stay in its dtype as before.
    """
    import torch

    def cast_in(module, args):
        x = args[0]
        if torch.is_autocast_enabled(x.device.type) or x.dtype == module.weight.dtype:
            module._llmlab_out_dtype = None
            return None
        module._llmlab_out_dtype = x.dtype
        return (x.to(module.weight.dtype), *args[1:])

    def cast_out(module, args, out):
        dtype = getattr(module, "_llmlab_out_dtype", None)
        return out if dtype is None else out.to(dtype)

    head.register_forward_pre_hook(cast_in)
    head.register_forward_hook(cast_out)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def transformers_model(model):
    """The transformers model itself: inside PEFT's wrappers (with the adapter layers in it), or `model`."""
    return model.get_base_model() if is_peft_model(model) else model


def uses_virtual_tokens(model) -> bool:
    """True for prefix / prompt tuning: PEFT prepends virtual tokens and extends only 2-D masks."""
    return is_peft_model(model) and bool(getattr(model.active_peft_config, "is_prompt_learning", False))


# ---- PEFT settings that follow the strategy (a config transform, not a rule: the rules are checks/strategy.py)

def quant_storage_for(peft_cfg: Any, strategy_cfg: Any, precision: Any = "32-true") -> str | None:
    """The storage dtype QLoRA's packed 4-bit weights get under this strategy (None: bitsandbytes' uint8).

    ZeRO-3 partitions parameters as flat float buffers: uint8-packed 4-bit weights cannot be sharded;
    the same bytes viewed as a float dtype can. That dtype must be the one DeepSpeed casts floating
    parameters to (`precision.parameter_dtype`), or the cast would corrupt the packed bits. So under
    ZeRO-3 an unset `peft.quantization.quant_storage` becomes that dtype (checked on CPU: bfloat16 with
    bf16-true and bf16-mixed, float32 with 32-true); an explicit choice is kept (llmlab.checks.strategy.check_run
    refuses the ones that cannot work).
    """
    if peft_cfg is None or peft_cfg.get("method") != "qlora":
        return None
    storage = (peft_cfg.get("quantization") or {}).get("quant_storage")
    if storage is None and is_zero3(strategy_cfg):
        return parameter_dtype(precision)
    return storage


def peft_for_strategy(peft_cfg: Any, strategy_cfg: Any, precision: Any = "32-true") -> Any:
    """`peft_cfg`, with `quantization.quant_storage` as `quant_storage_for` decides (a copy when it changes).

    llmlab.stages.build builds every model through this, so `peft=qlora strategy=zero3` needs no extra flag."""
    storage = quant_storage_for(peft_cfg, strategy_cfg, precision)
    if peft_cfg is None or peft_cfg.get("method") != "qlora" or storage == peft_cfg.quantization.get("quant_storage"):
        return peft_cfg
    # lazy: config nodes only reach here once Hydra has loaded omegaconf (export and generate import this
    # module and answer --help without it)
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(peft_cfg, resolve=True))
    node.quantization.quant_storage = storage
    return node
