"""Stage `kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired labelled examples.

The dpo stage with another batch: B single examples, each desirable or not (data format `unpaired`,
llmlab/data/unpaired.py), and the loss `llmlab.losses.KTOLoss`. The reference is built exactly as for
dpo (a frozen copy of the starting checkpoint, the PEFT base, or `reference_model=`). A (2B, T) batch
holds the examples (rows [0, B)) and the mismatched prompt/completion pairs (rows [B, 2B)) the KL
reference point is estimated on: the policy scores the examples with gradients and the mismatched
pairs without (the reference point is detached), the reference scores all 2B rows.

Validation: `val/reward_accuracy` is the share of held-out examples whose implicit reward
beta * (log pi - log ref) has the sign of its label (> 0 desirable, < 0 undesirable; 0 at step 0, as
DPO's accuracy); `val/reward_margin` = mean desirable reward - mean undesirable reward; `val/kl` the
reference point; exact match of greedy answers on the desirable examples' prompts (`val/exact_match`).
"""
from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from llmlab.evaluation.generation import greedy_answers, needs_synced_gpus
from llmlab.losses import KTOLoss
from llmlab.stages.common import add_router_aux, for_backward, forward_logits, log_train, step_mean
from llmlab.stages.dpo import DPOModule, rows_of


class KTOModule(DPOModule):
    data_format = "unpaired"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, loss: torch.nn.Module | None = None, **kw):
        super().__init__(model, tokenizer, optimizer, scheduler, loss=loss if loss is not None else KTOLoss(), **kw)
        if self.sft_weight:
            raise ValueError("stage=kto has no NLL term: set stage.module.sft_weight=0")
        self.val_kl = MeanMetric()

    def _losses(self, batch):
        B = batch["desirable"].shape[0]
        examples, mismatched = rows_of(batch, slice(0, B)), rows_of(batch, slice(B, 2 * B))
        router_aux = [] if self.training else None  # an MoE model's router loss of the policy's forward
        policy = self._sequence_logps(forward_logits(self.model, examples, self.packing, router_aux),
                                      examples["labels"])  # (B,)
        with torch.no_grad():  # the KL reference point is detached: no graph for these rows
            policy_kl = self._sequence_logps(forward_logits(self.model, mismatched, self.packing),
                                             mismatched["labels"])  # (B,)
        reference = self.reference_logps(batch)  # (2B,): examples, then mismatched pairs
        out = self.loss_fn(policy, reference[:B], batch["desirable"], policy_kl, reference[B:])
        # the step's mean over its examples, however it is split into micro-batches and ranks
        loss = add_router_aux(self, step_mean(self, out.losses.sum(), batch, "examples", B), router_aux)
        return loss, out

    @staticmethod
    def _accuracy_and_margin(out, desirable):
        r = out.rewards  # (B,)
        right = torch.where(desirable, r > 0, r < 0).float()  # the reward's sign agrees with the label
        good, bad = r[desirable], r[~desirable]
        margin = (good.mean() - bad.mean()) if good.numel() and bad.numel() else None
        return right.mean(), margin

    def training_step(self, batch, batch_idx):
        loss, out = self._losses(batch)
        accuracy, margin = self._accuracy_and_margin(out, batch["desirable"])
        log_train(self, "train/loss", loss, prog_bar=True)
        log_train(self, "train/reward_accuracy", accuracy)
        log_train(self, "train/kl", out.kl)
        if margin is not None:
            log_train(self, "train/reward_margin", margin)
        return for_backward(self, loss)

    def validation_step(self, batch, batch_idx):
        loss, out = self._losses(batch)
        desirable, r = batch["desirable"], out.rewards
        accuracy, margin = self._accuracy_and_margin(out, desirable)
        n = int(desirable.numel())
        if torch.isfinite(loss):
            self.val_loss.update(loss, weight=n)
        self.val_accuracy.update(accuracy, weight=n)
        if margin is not None:
            self.val_margin.update(margin, weight=n)
        if desirable.any():
            self.val_chosen.update(r[desirable].mean(), weight=int(desirable.sum()))
        if (~desirable).any():
            self.val_rejected.update(r[~desirable].mean(), weight=int((~desirable).sum()))
        self.val_kl.update(out.kl, weight=n)
        for key, metric in (("loss", self.val_loss), ("reward_accuracy", self.val_accuracy)):
            self.log(f"val/{key}", metric, prog_bar=True)
        self.log("val/reward_margin", self.val_margin)
        self.log("val/rewards_chosen", self.val_chosen)
        self.log("val/rewards_rejected", self.val_rejected)
        self.log("val/kl", self.val_kl)
        if self.eval_generation:  # the desirable completions are the reference answers
            synced = needs_synced_gpus(self.model)
            # ZeRO-3 ranks generate in lockstep: then every rank generates for all its rows
            idx = torch.arange(n, device=desirable.device) if synced else desirable.nonzero().flatten()
            if idx.numel():
                answers = greedy_answers(self.model, self.tokenizer, batch["prompt_ids"][idx],
                                         batch["prompt_mask"][idx], self.max_new_tokens, synced_gpus=synced)
                keep = [(a, batch["answers"][i]) for a, i in zip(answers, idx.tolist()) if bool(desirable[i])]
                if keep:
                    self.val_exact_match.update([a for a, _ in keep], [b for _, b in keep])
            self.log("val/exact_match", self.val_exact_match, prog_bar=True)
