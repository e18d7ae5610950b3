"""Stage `dpo`: direct preference optimisation against a frozen reference (Rafailov et al. 2023).

The loss is a small module picked by `_target_` (llmlab.losses.DPOLoss: sigmoid, with cDPO label
smoothing; llmlab.losses.IPOLoss; the reference-free ORPOLoss and SimPOLoss of stage=orpo / stage=simpo,
for which no reference is built: `needs_reference = False`). The reference is the starting checkpoint: under PEFT the same
model with its adapter disabled (no second copy), otherwise a frozen copy, or `reference_model=`
(a run dir or HF path with the same tokenizer). `precompute_reference=true` scores every training and
validation pair with the reference once before training and then frees the copy.
`split_pairs=true` trades one more policy forward for half the activation memory: the chosen rows and
the rejected rows each go through the policy under activation checkpointing, so only one half's
activations exist at a time (while its backward runs). Same loss and gradients as the one-pass step.
`share_prompt=true` runs each pair's prompt once (its key/value cache serves both the chosen and the
rejected completion, stages/shared_prefix.py), in the policy's and the reference's forward: the same
log-probs and gradients with (P + R) / (P / 2 + R) fewer tokens (the default); pairs whose rows do not share
their prompt (cut differently to fit), gradient checkpointing and prompt-learning PEFT take the full forward,
and under `split_pairs=true` the policy's halves run apart (the reference pass still shares).

A batch of B pairs is one (2B, T) tensor (chosen rows, then rejected), so one policy forward and one
reference forward score both. Logged: loss, implicit rewards beta * (log pi - log ref) of chosen and
rejected, reward accuracy (`val/reward_accuracy`) and margin (`val/reward_margin`), and the exact
match of greedy answers to the held-out prompts (`val/exact_match`, same metric as stage=sft).
A step whose loss is not finite is skipped on all ranks by the shared guard (`llmlab.optim.StepGuard`,
counted in `train/skipped_steps`), never applied.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from llmlab.evaluation.generation import greedy_answers
from llmlab.evaluation.metrics import ExactMatch
from llmlab.losses import DPOLoss, causal_lm_loss_sum, sequence_logprobs
from llmlab.models.moe import router_aux_coef
from llmlab.optim import any_rank
from llmlab.stages import alignment
from llmlab.stages.alignment import FrozenReference, load_reference
from llmlab.stages.common import (
    add_router_aux,
    configure_optimizers,
    for_backward,
    forward_logits,
    log_train,
    step_mean,
)
from llmlab.stages.interface import Stage
from llmlab.stages.shared_prefix import (
    can_share_prompt,
    pair_completions,
    pair_token_logprobs,
)

log = logging.getLogger("llmlab")


def _row_key(ids: torch.Tensor, segment_ids: torch.Tensor) -> tuple:
    """A hashable key for one sequence: its tokens without padding."""
    return tuple(ids[segment_ids >= 0].tolist())


def rows_of(batch: dict, rows: slice) -> dict:
    """Some rows of a (2B, T) batch: each per-row tensor (input_ids, labels, segment_ids, position_ids, ...)."""
    n = batch["input_ids"].shape[0]
    return {k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n}


class DPOModule(Stage):
    data_format = "preference"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, loss: torch.nn.Module | None = None,
                 packing: str = "document", reference_model: str | None = None,
                 precompute_reference: bool = False, sft_weight: float = 0.0, disable_dropout: bool = True,
                 eval_generation: bool = True, max_new_tokens: int = 16, split_pairs: bool = False,
                 share_prompt: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory, self.packing = optimizer, scheduler, packing
        self.loss_fn = loss if loss is not None else DPOLoss()
        self.sft_weight, self.precompute, self.eval_generation = sft_weight, precompute_reference, eval_generation
        self.max_new_tokens, self.split_pairs = max_new_tokens, split_pairs
        self.share_prompt = share_prompt  # each pair's prompt through the model once (stages/shared_prefix.py)
        if disable_dropout:
            alignment.disable_dropout(model)
        # a reference-free loss (ORPO, SimPO: `needs_reference = False`) gets no reference at all: no
        # frozen copy in memory, no second forward (checks.entry.check_settings refuses reference settings then)
        self.reference = None
        if self.needs_reference:
            ref = load_reference(reference_model, tokenizer) if reference_model else None
            self.reference = FrozenReference(model, ref)
        self.ref_cache: dict[tuple, float] = {}  # sequence tokens -> reference log-prob (precompute)
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_chosen, self.val_rejected, self.val_logps_chosen = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_exact_match = ExactMatch()

    # ------------------------------------------------------------------ log-probs
    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against a reference policy (the loss declares it; DPO, IPO, KTO: yes)."""
        return bool(getattr(self.loss_fn, "needs_reference", True))

    @property
    def average_logps(self) -> bool:
        """Whether the loss wants each sequence's mean log-prob per response token instead of the sum
        (the loss declares it: `average_logps`, e.g. IPO's length-normalised form)."""
        return bool(getattr(self.loss_fn, "average_logps", False))

    def _sequence_logps(self, logits, labels) -> torch.Tensor:
        return sequence_logprobs(logits, labels, average=self.average_logps)  # (2B,)

    def _shared(self, model, batch):
        """The batch as prompts + completions when `share_prompt` applies to it and to `model`, else None."""
        if not self.share_prompt or not can_share_prompt(model) or router_aux_coef(model):
            return None  # (an MoE model's router loss: computed on the policy's full rows, forward_logits)
        shared = pair_completions(batch)
        # every rank takes the same path (collective): under ZeRO-3 the ranks' module calls gather parameters
        # together, so one rank's full rows beside another's prompt + completions passes would deadlock
        return None if any_rank(shared is None) else shared

    def _shared_terms(self, model, shared, with_nll: bool):
        """(log-probs (2B,), the chosen rows' (NLL sum, tokens) or None) with each prompt run once."""
        token_logps = pair_token_logprobs(model, shared)  # (2B, R), 0 at padding
        counts = shared[3].sum(-1)  # (2B,) completion tokens per row
        total = token_logps.sum(-1)  # (2B,)
        logps = total / counts.clamp_min(1) if self.average_logps else total
        B = counts.shape[0] // 2
        return logps, ((-token_logps[:B].sum(), counts[:B].sum()) if with_nll else None)

    def policy_logps(self, batch, router_aux: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(response log-probs (2B,): sums, or means if the loss asks, and logits (2B, T, V)) under the policy;
        an MoE model's router load-balancing loss appended to `router_aux` (stages.common.forward_logits)."""
        logits = forward_logits(self.model, batch, self.packing, router_aux)
        return self._sequence_logps(logits, batch["labels"]), logits

    def policy_terms(self, batch, router_aux: list | None = None) -> tuple[torch.Tensor, tuple | None]:
        """(response log-probs (2B,) under the policy, (NLL sum, target tokens) of the chosen rows when
        the loss adds an NLL term (`sft_weight`), else None); router losses appended to `router_aux`."""
        B = batch["input_ids"].shape[0] // 2
        if self.split_pairs and torch.is_grad_enabled():  # the halves apart (share_prompt: the reference only)
            chosen, nll = self._checkpointed_half(batch, slice(0, B), bool(self.sft_weight), router_aux)
            rejected, _ = self._checkpointed_half(batch, slice(B, 2 * B), False, router_aux)
            return torch.cat([chosen, rejected]), nll
        shared = self._shared(self.model, batch)
        if shared is not None:
            return self._shared_terms(self.model, shared, with_nll=bool(self.sft_weight))
        policy, logits = self.policy_logps(batch, router_aux)
        nll = causal_lm_loss_sum(logits[:B], batch["labels"][:B]) if self.sft_weight else None
        return policy, nll

    def _checkpointed_half(self, batch, rows: slice, with_nll: bool, router_aux: list | None = None):
        """(log-probs of `rows` (B,), their (NLL sum, tokens) or None) under non-reentrant activation
        checkpointing: the forward keeps only its inputs and these small outputs; backward recomputes the
        half's activations, and autograd finishes one half's graph (its nodes are newer) before the other's."""
        half = rows_of(batch, rows)  # input_ids, labels, segment_ids, position_ids, ... (B, T)

        def run(*tensors):
            rows_batch, aux = dict(zip(half, tensors)), ([] if router_aux is not None else None)
            logits = forward_logits(self.model, rows_batch, self.packing, aux)  # (B, T, V), freed after this call
            logps = self._sequence_logps(logits, rows_batch["labels"])
            return logps, (causal_lm_loss_sum(logits, rows_batch["labels"]) if with_nll else None), \
                (aux[0] if aux else None)  # returned, not appended: backward re-runs `run`

        logps, nll, aux = checkpoint(run, *half.values(), use_reentrant=False)
        if aux is not None:
            router_aux.append(aux)
        return logps, nll

    def reference_logps(self, batch) -> torch.Tensor:
        """(2B,) under the reference: from the precomputed cache, else a no-grad forward."""
        if self.ref_cache:
            keys = [_row_key(i, s) for i, s in zip(batch["input_ids"], batch["segment_ids"])]
            if all(k in self.ref_cache for k in keys):
                return torch.tensor([self.ref_cache[k] for k in keys], device=batch["input_ids"].device)
            if self.reference.copy is None and not self.reference.shares_policy:
                raise RuntimeError("a pair missing from the precomputed reference log-probs")
        with self.reference.model() as ref:
            shared = self._shared(ref, batch)
            if shared is not None:
                return self._shared_terms(ref, shared, with_nll=False)[0]
            return self._sequence_logps(forward_logits(ref, batch, self.packing), batch["labels"])

    @torch.no_grad()
    def _precompute(self, dataset, collate, batch_size: int) -> None:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.reference.model() as ref:
                logps = self._sequence_logps(forward_logits(ref, batch, self.packing), batch["labels"])
            for ids, seg, lp in zip(batch["input_ids"], batch["segment_ids"], logps.tolist()):
                self.ref_cache[_row_key(ids, seg)] = lp

    def on_fit_start(self):
        super().on_fit_start()
        if not self.precompute or self.ref_cache or self.reference is None:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "train_set"):
            raise RuntimeError("precompute_reference=true needs the llmlab datamodule")
        size = dm.cfg.get("val_batch_size") or dm.cfg.batch_size
        self._precompute(dm.train_set, dm.format.collate, size)
        self._precompute(dm.val_set, dm.format.collate, size)
        log.info("dpo: precomputed reference log-probs of %d sequences", len(self.ref_cache))
        if self.reference.copy is not None:  # no longer needed: free its memory
            self.reference.copy = None

    # ------------------------------------------------------------------ steps
    def _losses(self, batch):
        router_aux = [] if self.training else None  # an MoE model's router losses of the policy's forwards
        policy, nll = self.policy_terms(batch, router_aux)  # (2B,), chosen rows' (NLL sum, tokens) or None
        B = policy.shape[0] // 2
        if self.reference is None:  # reference-free: the loss's rewards come from the policy alone
            out = self.loss_fn(policy[:B], policy[B:])
        else:
            reference = self.reference_logps(batch)  # (2B,)
            out = self.loss_fn(policy[:B], policy[B:], reference[:B], reference[B:])
        # both terms as the step's means (over its pairs, over its chosen tokens), whatever the split
        loss = step_mean(self, out.loss * B, batch, "pairs", B)  # out.loss is a mean over the B pairs
        if nll is not None:  # RPO-style NLL on the chosen answers keeps them likely (sft_weight > 0)
            loss = loss + self.sft_weight * step_mean(self, nll[0], batch, "tokens", nll[1])
        return add_router_aux(self, loss, router_aux), out, policy[:B].detach()

    def training_step(self, batch, batch_idx):
        loss, out, _ = self._losses(batch)
        chosen, rejected = out.chosen_rewards, out.rejected_rewards  # (B,), (B,)
        # per optimizer step: means over micro-batches and ranks
        log_train(self, "train/loss", loss, prog_bar=True)
        log_train(self, "train/reward_accuracy", (chosen > rejected).float().mean())
        log_train(self, "train/reward_margin", (chosen - rejected).mean())
        log_train(self, "train/rewards_chosen", chosen.mean())
        log_train(self, "train/rewards_rejected", rejected.mean())
        return for_backward(self, loss)

    def validation_step(self, batch, batch_idx):
        loss, out, logps_chosen = self._losses(batch)
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        finite = torch.isfinite(chosen) & torch.isfinite(rejected)  # NaN-safe means
        n = int(finite.sum())
        if n:
            c, r = chosen[finite], rejected[finite]
            self.val_accuracy.update((c > r).float().mean(), weight=n)
            self.val_margin.update((c - r).mean(), weight=n)
            self.val_chosen.update(c.mean(), weight=n)
            self.val_rejected.update(r.mean(), weight=n)
            self.val_logps_chosen.update(logps_chosen[finite].mean(), weight=n)
        if torch.isfinite(loss):
            self.val_loss.update(loss, weight=chosen.numel())
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/reward_accuracy", self.val_accuracy, prog_bar=True)
        self.log("val/reward_margin", self.val_margin)
        self.log("val/rewards_chosen", self.val_chosen)
        self.log("val/rewards_rejected", self.val_rejected)
        self.log("val/logps_chosen", self.val_logps_chosen)
        if self.eval_generation:
            answers = greedy_answers(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                     self.max_new_tokens)
            self.val_exact_match.update(answers, batch["answers"])
            self.log("val/exact_match", self.val_exact_match, prog_bar=True)

    def summary_values(self, summary: dict) -> dict:
        return {"val_reward_accuracy": summary.get("val_reward_accuracy_last"),
                "val_reward_margin": summary.get("val_reward_margin_last")}

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)
