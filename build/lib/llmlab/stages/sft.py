"""Stage `sft`: supervised fine-tuning on prompt/response pairs (instruction tuning).

The loss covers the response and its EOS only (prompt tokens are IGNORE_INDEX, see
llmlab/data/formats.py:SFTFormat), so the model learns to answer and to stop. Validation reports the
token-weighted loss on held-out responses and, when the data has reference answers, the exact match
of greedy generations (`val/exact_match`; summary.json: `val_exact_match_first` before training,
`val_exact_match_last` after).
"""
from __future__ import annotations

from torchmetrics import MeanMetric

from llmlab.evaluation.generation import greedy_answers
from llmlab.evaluation.metrics import ExactMatch
from llmlab.losses import causal_lm_loss_sum
from llmlab.stages.common import configure_optimizers, forward_logits, lm_training_step
from llmlab.stages.interface import Stage


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works with frozen inputs under PEFT)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class SFTModule(Stage):
    data_format = "sft"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, packing: str = "document",
                 eval_generation: bool = True, max_new_tokens: int = 16, gradient_checkpointing: bool = False,
                 num_logged_predictions: int = 4, loss_chunk_tokens: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory, self.packing = optimizer, scheduler, packing
        self.loss_chunk_tokens = loss_chunk_tokens  # training loss: the head over this many tokens at a time
        self.eval_generation, self.max_new_tokens = eval_generation, max_new_tokens
        self.num_logged_predictions = num_logged_predictions
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.val_loss = MeanMetric()  # token-weighted, exact across batches and ranks
        self.val_exact_match = ExactMatch()
        self.predictions: list[dict] = []  # a few (prompt, generated, answer) of the last validation

    def training_step(self, batch, batch_idx):
        return lm_training_step(self, batch)

    def on_validation_epoch_start(self):
        self.predictions = []

    def validation_step(self, batch, batch_idx):
        logits = forward_logits(self.model, batch, self.packing)
        loss_sum, n_tokens = causal_lm_loss_sum(logits, batch["labels"])
        self.val_loss.update(loss_sum / n_tokens.clamp(min=1), weight=n_tokens)
        self.log("val/loss", self.val_loss, prog_bar=True)
        if self.eval_generation and "prompt_ids" in batch:
            generated = greedy_answers(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                       self.max_new_tokens)
            self.val_exact_match.update(generated, batch["answers"])
            self.log("val/exact_match", self.val_exact_match, prog_bar=True)
            room = self.num_logged_predictions - len(self.predictions)
            for ids, mask, text, answer in list(zip(batch["prompt_ids"], batch["prompt_mask"], generated,
                                                    batch["answers"]))[:max(room, 0)]:
                prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                self.predictions.append({"prompt": prompt, "generated": text, "answer": answer})

    def summary_values(self, summary: dict) -> dict:
        return {"val_predictions": self.predictions} if self.predictions else {}

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)
