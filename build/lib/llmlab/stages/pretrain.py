"""Stage `pretrain`: causal-LM next-token prediction on packed blocks."""
from __future__ import annotations

from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from llmlab.losses import IGNORE_INDEX, causal_lm_loss_sum
from llmlab.stages.common import configure_optimizers, forward_logits, lm_training_step
from llmlab.stages.interface import Stage


class PretrainModule(Stage):
    data_format = "lm"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, packing: str = "document",
                 loss_chunk_tokens: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory, self.packing = optimizer, scheduler, packing
        self.loss_chunk_tokens = loss_chunk_tokens  # training loss: the head over this many tokens at a time
        self.val_loss = MeanMetric()  # token-weighted, so the mean is exact across batches and ranks
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def training_step(self, batch, batch_idx):
        return lm_training_step(self, batch)

    def validation_step(self, batch, batch_idx):
        logits = forward_logits(self.model, batch, self.packing)
        loss_sum, n_tokens = causal_lm_loss_sum(logits, batch["labels"])
        self.val_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)
