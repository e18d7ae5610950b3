"""HFExport: save the trained model and tokenizer in Hugging Face format (`<run_dir>/hf`).

`hf/` always holds a standalone model that `AutoModelForCausalLM.from_pretrained` loads. For PEFT
runs it is the base with the adapter merged in (QLoRA: into the de-quantized base), and the adapter
alone goes to `hf_adapter/` (`PeftModel.from_pretrained(base, "hf_adapter")`). Prefix/prompt tuning
have nothing to merge: they write `hf_adapter/` only. See llmlab/export.py.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L

from llmlab.checkpointing.atomic import remove, replace_path, sibling
from llmlab.distributed.detect import is_zero3
from llmlab.distributed.zero3 import (
    gathered_parameters,
    save_pretrained_gathered,
    settle_partitions,
)
from llmlab.models.export import export_model
from llmlab.models.peft import is_peft_model


class HFExport(L.Callback):
    """Runs when training ends (before the strategy tears down, so a DeepSpeed engine is still intact).

    Under ZeRO-3 every rank holds only shards of each parameter: the export is collective. All ranks
    gather the full weights (a PEFT model: all of it, the merge needs the base; a full model: one
    layer at a time) and rank 0 writes. Saved naively on rank 0, `hf/` would hold empty tensors.
    `hf/` and `hf_adapter/` are written under `.partial` names and renamed into place when complete.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        model, tokenizer = pl_module.model, pl_module.tokenizer
        adapter_dir = self.path.with_name(self.path.name + "_adapter")
        if not is_zero3(model):
            if trainer.is_global_zero:
                export_model(model, tokenizer, self.path, adapter_dir=adapter_dir)
            return
        settle_partitions(trainer.strategy)  # nothing left in flight from the last forward
        if is_peft_model(model):
            with gathered_parameters(model):
                if trainer.is_global_zero:
                    export_model(model, tokenizer, self.path, adapter_dir=adapter_dir)
        else:  # written as hf.partial by all ranks, renamed into place by rank 0 when complete
            tmp = sibling(self.path, ".partial")
            if trainer.is_global_zero:
                remove(tmp)
            trainer.strategy.barrier("hf_export_prepare")
            save_pretrained_gathered(model, str(tmp))
            if trainer.is_global_zero:
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                replace_path(tmp, self.path)
        trainer.strategy.barrier("hf_export")
