"""Stage `rm`: a reward model trained on preference pairs (InstructGPT's pairwise loss).

The model is any base with a one-output sequence-classification head (`stage.head`), decoder
(GPT-2, OPT, Llama: the score of the last non-padding token) or encoder (DeBERTa, RoBERTa: the
pooled first token); pooling is the Hugging Face model's own, so the exported `hf/` scores exactly
as it did here when loaded with `AutoModelForSequenceClassification.from_pretrained`.
A batch of B pairs is one (2B, T) tensor: chosen rows first, then rejected (PreferenceFormat), so one
forward scores both. Validation: pairwise accuracy (`val/accuracy`; summary.json `val_accuracy`) and
the mean margin r_chosen - r_rejected (`val/margin`).

Dropout is off by default (`disable_dropout`, as TRL's RewardTrainer): the pairwise loss compares two
scores of one forward pass, and independent dropout masks on the chosen and rejected rows add noise to
exactly the difference being learned; the exported model is used without dropout anyway.
"""
from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from llmlab.losses import PairwiseRewardLoss, pairwise_accuracy
from llmlab.stages import alignment
from llmlab.stages.common import (
    configure_optimizers,
    for_backward,
    log_train,
    step_mean,
)
from llmlab.stages.interface import Stage


def sequence_scores(model, batch: dict) -> torch.Tensor:
    """One scalar per row (2B,) from a sequence classifier; padding (segment id -1) is masked."""
    attention_mask = (batch["segment_ids"] >= 0).long()  # (2B, T)
    return model(input_ids=batch["input_ids"], attention_mask=attention_mask).logits.squeeze(-1).float()


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...)."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


class RewardModule(Stage):
    data_format = "preference"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, loss: torch.nn.Module | None = None,
                 disable_dropout: bool = True):
        super().__init__()
        if disable_dropout:
            alignment.disable_dropout(model)
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss_fn = loss if loss is not None else PairwiseRewardLoss()
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False  # decoder bases would build a KV cache nobody reads
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_chosen, self.val_rejected = MeanMetric(), MeanMetric()

    def _step(self, batch):
        r_chosen, r_rejected = split_pairs(sequence_scores(self.model, batch))  # (B,), (B,)
        return self.loss_fn(r_chosen, r_rejected), r_chosen.detach(), r_rejected.detach()

    def training_step(self, batch, batch_idx):
        loss, r_chosen, r_rejected = self._step(batch)
        n_pairs = r_chosen.numel()
        # the optimizer step's mean over all its pairs (micro-batches and ranks), as one big batch
        loss = step_mean(self, loss * n_pairs, batch, "pairs", n_pairs)
        log_train(self, "train/loss", loss, prog_bar=True)
        log_train(self, "train/accuracy", pairwise_accuracy(r_chosen, r_rejected))
        log_train(self, "train/margin", (r_chosen - r_rejected).mean())
        return for_backward(self, loss)  # DeepSpeed divides by the accumulation once more

    def validation_step(self, batch, batch_idx):
        loss, r_chosen, r_rejected = self._step(batch)
        n = r_chosen.numel()
        self.val_loss.update(loss, weight=n)
        self.val_accuracy.update(pairwise_accuracy(r_chosen, r_rejected), weight=n)
        self.val_margin.update((r_chosen - r_rejected).mean(), weight=n)
        self.val_chosen.update(r_chosen.mean(), weight=n)
        self.val_rejected.update(r_rejected.mean(), weight=n)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)
        self.log("val/margin", self.val_margin)
        self.log("val/reward_chosen", self.val_chosen)
        self.log("val/reward_rejected", self.val_rejected)

    def summary_values(self, summary: dict) -> dict:
        return {"val_accuracy": summary.get("val_accuracy_last"), "val_margin": summary.get("val_margin_last")}

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)
