"""HFExport: save the trained model and tokenizer in Hugging Face format (`<run_dir>/hf`)."""
from __future__ import annotations

from pathlib import Path

import lightning as L


class HFExport(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            pl_module.model.save_pretrained(self.path)
            pl_module.tokenizer.save_pretrained(self.path)
