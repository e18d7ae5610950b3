"""Export a trained model (the library half of `python -m llmlab.export`, also what the run's `hf/` is
written with): the PEFT adapter alone and a standalone merged model, both in HF format. For QLoRA the base
is de-quantized first, so the merged model computes what the trained (quantized base + adapter) model
computed, up to rounding; prefix and prompt tuning have nothing to merge (only the adapter is written).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from llmlab.checkpointing.atomic import atomic_dir
from llmlab.models.peft import import_peft, is_peft_model

log = logging.getLogger("llmlab")

def _base_tensor(module_tensor, module=None):
    """A base weight as a plain tensor; bitsandbytes 4-bit and 8-bit (LLM.int8) weights are de-quantized."""
    if type(module_tensor).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf  # lazy: optional; its import warns on CPU

        return bnbf.dequantize_4bit(module_tensor.data, module_tensor.quant_state)
    if type(module_tensor).__name__ == "Int8Params":
        # int8 (out, in) with one absmax per row (SCB, on the weight or the layer's state): W = q * SCB / 127
        scb = module_tensor.SCB if getattr(module_tensor, "SCB", None) is not None else module.state.SCB
        return module_tensor.data.float() * scb.float()[:, None] / 127.0
    return module_tensor.detach()


def _is_conv1d(model, module_name: str) -> bool:
    """True when `module_name` in `model` is transformers' Conv1D (GPT-2's (in, out) linear layers)."""
    # lazy (transformers, torch below): llmlab.export imports this module and checks its arguments first
    from transformers.pytorch_utils import Conv1D

    try:
        return isinstance(model.get_submodule(module_name), Conv1D)
    except AttributeError:
        return False


def plain_base_model(peft_model, dtype=None):
    """A new, unwrapped copy of the PEFT model's base: original module names, adapters left out,
    4-bit weights de-quantized. The PEFT model itself is not changed."""
    import torch  # lazy: see _is_conv1d

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    quantized = hasattr(config, "quantization_config")
    if quantized:
        compute = getattr(base, "hf_quantizer", None)
        compute = compute.quantization_config if compute is not None else None
        eight_bit = bool(getattr(compute, "load_in_8bit", False))  # LLM.int8: computes in fp32 / fp16
        compute = torch.float32 if eight_bit else (compute.bnb_4bit_compute_dtype if compute is not None else torch.bfloat16)
        dtype = dtype or compute
        del config.quantization_config
    with torch.device("meta"):
        plain = type(base)._from_config(config)
    source = dict(base.named_parameters(remove_duplicate=False))  # tied weights under both names
    source.update(dict(base.named_buffers(remove_duplicate=False)))
    state = {}
    for key, meta in list(plain.state_dict(keep_vars=True).items()):
        head, _, leaf = key.rpartition(".")
        # PEFT's wrappers: a LoRA layer's `base_layer`, a saved module's `original_module`; fused MoE expert tensors
        # adapted as target_parameters get one wrapper per parameter, nested (experts.base_layer.base_layer.*)
        candidates = (key, f"{head}.base_layer.{leaf}", f"{head}.base_layer.base_layer.{leaf}",
                      f"{head}.original_module.{leaf}")
        found = next((c for c in candidates if c in source), None)
        if found is None:
            raise KeyError(f"export: no base tensor for {key!r}")
        four_bit = type(source[found]).__name__ in ("Params4bit", "Int8Params")
        owner = found.rpartition(".")[0]
        tensor = _base_tensor(source[found], base.get_submodule(owner) if four_bit else None)
        if four_bit and leaf == "weight" and _is_conv1d(plain, head):
            # bitsandbytes holds GPT-2's Conv1D (in, out) weights as Linear4bit/8bitLt (out, in): de-quantized
            # they come back transposed (square ones too, so the shape alone cannot tell)
            tensor = tensor.t()
        tensor = tensor.reshape(meta.shape)  # 4-bit storage is flat (N*K/2, 1) until de-quantized
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor.clone()
    plain.load_state_dict(state, assign=True, strict=True)
    for key, buf in list(plain.named_buffers()):  # non-persistent buffers (e.g. RoPE inv_freq)
        if buf.is_meta:
            owner, _, leaf = key.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, source[key].clone(), persistent=False)
    plain.tie_weights()
    return plain.eval()


def merged_model(peft_model, adapter_dir: Path, dtype=None):
    """A standalone model: the (de-quantized) base with the adapter saved in `adapter_dir` merged in."""
    peft = import_peft()
    base = plain_base_model(peft_model, dtype)
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def can_merge(peft_model) -> bool:
    return not bool(getattr(peft_model.active_peft_config, "is_prompt_learning", False))


def save_adapter(peft_model, tokenizer, out: Path) -> None:
    peft_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_merged(peft_model, tokenizer, adapter_dir: Path, out: Path, dtype=None) -> None:
    """Write the merged standalone model (+ tokenizer); loadable with AutoModelForCausalLM."""
    model = merged_model(peft_model, adapter_dir, dtype)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def export_model(model, tokenizer, merged_dir: Path, adapter_dir: Path | None = None, dtype=None) -> dict:
    """Export an in-memory model: full fine-tuning -> `merged_dir`; PEFT -> adapter + merged.

    Returns {"merged": path or None, "adapter": path or None}.
    """
    # each directory is written as <dir>.partial and renamed into place when complete (a kill -9
    # mid-export leaves the previous export, never a torn one)
    merged_dir = Path(merged_dir)
    if not is_peft_model(model):
        with atomic_dir(merged_dir) as tmp:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return {"merged": str(merged_dir), "adapter": None}
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else merged_dir.with_name(merged_dir.name + "_adapter")
    with atomic_dir(adapter_dir) as tmp:
        save_adapter(model, tokenizer, tmp)
    if not can_merge(model):
        log.info("export: %s has nothing to merge (virtual tokens); adapter only: %s",
                 model.active_peft_config.peft_type, adapter_dir)
        return {"merged": None, "adapter": str(adapter_dir)}
    with atomic_dir(merged_dir) as tmp:
        save_merged(model, tokenizer, adapter_dir, tmp, dtype)
    return {"merged": str(merged_dir), "adapter": str(adapter_dir)}


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
