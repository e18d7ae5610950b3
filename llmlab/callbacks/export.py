"""HFExport: save the trained model and tokenizer in Hugging Face format (`<run_dir>/hf`).

`hf/` always holds a standalone model that `AutoModelForCausalLM.from_pretrained` loads. For PEFT
runs it is the base with the adapter merged in (QLoRA: into the de-quantized base), and the adapter
alone goes to `hf_adapter/` (`PeftModel.from_pretrained(base, "hf_adapter")`). Prefix/prompt tuning
have nothing to merge: they write `hf_adapter/` only. See llmlab/export.py.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L


class HFExport(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            from llmlab.export import export_model

            export_model(pl_module.model, pl_module.tokenizer, self.path,
                         adapter_dir=self.path.with_name(self.path.name + "_adapter"))
