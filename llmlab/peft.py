"""PEFT as a function on a model: `apply_peft(model, cfg)`; `peft=none` returns the model unchanged."""
from __future__ import annotations


def quantization_config(peft_cfg, precision: str):
    """A BitsAndBytesConfig when the PEFT method quantizes the base (qlora), else None."""
    return None


def apply_peft(model, peft_cfg, head: str = "causal_lm"):
    if peft_cfg.method == "none":
        return model
    raise NotImplementedError(f"peft={peft_cfg.method}")
