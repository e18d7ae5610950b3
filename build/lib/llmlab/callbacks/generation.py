"""SampleGeneration: greedy continuations of fixed prompts, logged when training ends."""
from __future__ import annotations

import logging

import lightning as L

from llmlab.distributed.detect import is_zero3
from llmlab.evaluation.generation import generate_text, generation_context

log = logging.getLogger(__name__)


class SampleGeneration(L.Callback):
    def __init__(self, prompts: list[str], max_new_tokens: int = 32):
        self.prompts, self.max_new_tokens = list(prompts or []), max_new_tokens
        self.samples: list[dict] = []

    def on_train_end(self, trainer, pl_module):
        # when training ends, not at fit end: the strategy has not torn down (a DeepSpeed engine intact)
        base = pl_module.model.get_base_model() if hasattr(pl_module.model, "get_base_model") else pl_module.model
        if not self.prompts or not callable(getattr(base, "generate", None)):
            return  # nothing to ask, or a model that does not generate (stage=rm's classifier, with PEFT too)
        model = pl_module.model
        if not is_zero3(model):  # every rank has the whole model: rank 0 alone generates
            if trainer.is_global_zero:
                self.samples = self._generate(model, pl_module.tokenizer, {})
                self._log()
            return
        # ZeRO-3: parameters are shards; every rank gathers them and generates (collective), rank 0 logs
        with generation_context(model, trainer.strategy) as extra:
            self.samples = self._generate(model, pl_module.tokenizer, extra)
        if trainer.is_global_zero:
            self._log()

    def _generate(self, model, tokenizer, extra: dict) -> list[dict]:
        texts = generate_text(model, tokenizer, self.prompts, self.max_new_tokens, do_sample=False, **extra)
        return [{"prompt": p, "generated": t} for p, t in zip(self.prompts, texts)]

    def _log(self) -> None:
        for s in self.samples:
            log.info("sample | %r -> %r", s["prompt"], s["generated"])

    def summary_values(self, summary: dict) -> dict:  # SummarySource: RunSummary asks at fit end
        return {"samples": self.samples} if self.samples else {}
