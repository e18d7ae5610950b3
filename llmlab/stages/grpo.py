"""Stage `grpo`: group relative policy optimisation (Shao et al. 2024) and its variants (Dr. GRPO, DAPO,
GSPO), on rewards from the `reward` config group (llmlab/rewards.py).

One training batch of B prompts is one rollout and `num_iterations` passes over it:

1. rollout: `num_generations` (G) completions per prompt, sampled at `temperature` with the KV cache
   (`generate` inside `generation.generation_context`: ZeRO-3 generates on gathered weights; a PEFT
   policy samples with its adapter on, no merged copy); a completion ends at EOS (kept, a target) or
   after `max_completion_length` tokens (truncated). Sampling draws from the stage's own RNG state,
   saved in checkpoints with the prompt position, so a resumed run samples what the uninterrupted
   one would have;
2. rewards: each reward function on the decoded completions, weighted sum, plus DAPO's soft overlong
   penalty (`overlong_buffer` > 0); `dynamic_sampling` drops groups whose rewards all agree and
   refills from fresh training prompts (at most `max_refill_rounds` rounds, then keeps some dropped
   groups to hold the batch size);
3. advantages: group-relative, `scale_rewards` group | batch | none (losses/grpo.py);
4. update: per pass, shuffled mini-batches of `mini_batch_size` completions (null: the whole rollout),
   each one optimizer step, split into `micro_batch_size` forwards that accumulate gradients; the
   per-token clipped loss (epsilon / epsilon_high, token or sequence importance ratio) + beta x k3 KL
   to the reference (PEFT: adapter disabled; beta = 0: no reference is built at all), aggregated per
   `loss_type` with step-global normalisers (losses/grpo.py: micro-batches and ranks are one batch).
   With one pass and one mini-batch the old log-probs are the current ones detached (TRL's shortcut).
   `share_prompt` (default): generation and every log-prob forward run each group's prompt once and the
   completions on its cache (stages/shared_prefix.py: the same numbers, G x fewer prompt tokens).

Steps: Lightning counts optimizer steps (`trainer.max_steps`, `val_check_interval`), a rollout is
num_iterations x ceil(B*G / mini_batch_size) of them. Validation: greedy answers to held-out prompts ->
val/reward_mean, val/exact_match. summary.json: reward_mean_first/_last (first/last tenth of rollouts),
kl_last (null when beta = 0), val_exact_match_first/_last.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torchmetrics import MeanMetric

from llmlab.checks.stage import check_grpo_args
from llmlab.evaluation.generation import (
    generation_context,
    greedy_answers,
    model_stop_ids,
)
from llmlab.evaluation.metrics import ExactMatch
from llmlab.losses.grpo import (
    StepCounts,
    aggregate,
    group_advantages,
    grpo_token_loss,
    soft_overlong_penalty,
    zero_variance_groups,
)
from llmlab.rewards import Rewards, build_rewards
from llmlab.stages import alignment
from llmlab.stages.alignment import FrozenReference, load_reference
from llmlab.stages.common import (
    configure_optimizers,
    first_and_last_tenth,
    log_answer_validation,
    mean_over_ranks,
    position_ids_from_mask,
    sum_over_ranks,
)
from llmlab.stages.interface import RolloutStage
from llmlab.stages.ppo import response_mask
from llmlab.stages.shared_prefix import (
    can_share_prompt,
    full_logits,
    logprobs_and_entropy,
    prefill_prompts,
    shared_prompt_logits,
)


class GRPOModule(RolloutStage):
    data_format = "prompt"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, *, reward=None, rollout_batch_size: int = 16,
                 num_generations: int = 8, max_completion_length: int = 12, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_iterations: int = 1, mini_batch_size: int | None = None,
                 micro_batch_size: int | None = None, loss_type: str = "dapo", scale_rewards: str = "group",
                 epsilon: float = 0.2, epsilon_high: float | None = None, importance_sampling_level: str = "token",
                 beta: float = 0.0, reference_model: str | None = None, dynamic_sampling: bool = False,
                 max_refill_rounds: int = 2, overlong_buffer: int = 0, overlong_penalty_factor: float = 1.0,
                 mask_truncated_completions: bool = False, max_grad_norm: float | None = 1.0,
                 disable_dropout: bool = True, val_max_new_tokens: int | None = None, seed: int = 0,
                 share_prompt: bool = True):
        super().__init__()
        self.automatic_optimization = False  # num_iterations x mini-batches optimizer steps per rollout
        check_grpo_args(num_generations, rollout_batch_size, mini_batch_size, micro_batch_size, loss_type,
                        scale_rewards, importance_sampling_level, num_iterations, temperature)
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rewards = reward if isinstance(reward, Rewards) else build_rewards(reward)
        self.rollout_batch_size, self.G = rollout_batch_size, num_generations
        self.max_completion_length, self.temperature = max_completion_length, float(temperature)
        self.generation = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        self.num_iterations, self.loss_type, self.scale_rewards = num_iterations, loss_type, scale_rewards
        self.mini_batch_size = mini_batch_size or rollout_batch_size * num_generations
        self.micro_batch_size = micro_batch_size or self.mini_batch_size
        self.epsilon, self.epsilon_high, self.is_level = epsilon, epsilon_high, importance_sampling_level
        self.beta, self.dynamic_sampling, self.max_refill_rounds = beta, dynamic_sampling, max_refill_rounds
        self.overlong_buffer, self.overlong_penalty_factor = overlong_buffer, overlong_penalty_factor
        self.mask_truncated, self.max_grad_norm, self.seed = mask_truncated_completions, max_grad_norm, seed
        self.val_max_new_tokens = val_max_new_tokens or max_completion_length
        self.share_prompt = share_prompt  # the prompt's forward once per group (stages/shared_prefix.py)
        if disable_dropout:
            alignment.disable_dropout(model)
        # beta = 0: the loss has no KL term, so no reference is kept (no frozen copy in memory)
        ref = load_reference(reference_model, tokenizer) if reference_model and beta else None
        self.reference = FrozenReference(model, ref) if beta else None
        self.history: list[dict] = []  # per rollout: reward, kl (summary's first/last tenth)
        self.val_reward, self.val_exact_match = MeanMetric(), ExactMatch()
        self.generator = None       # mini-batch order, refill prompts (torch.Generator, checkpointed)
        self.sampling_state = None  # the RNG state generate samples from (checkpointed)

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def steps_per_iteration(self) -> int:
        return self.num_iterations * math.ceil(self.rollout_batch_size * self.G / self.mini_batch_size)

    def on_fit_start(self):
        super().on_fit_start()
        self.rewards.to(self.device)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["grpo"] = {"history": self.history, "generator": self.generator.get_state(),
                              "sampling_state": self.sampling_state}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("grpo") or {}
        self.history = list(state.get("history", []))
        if "generator" in state:
            self.generator = torch.Generator().manual_seed(0)
            self.generator.set_state(state["generator"])
            self.sampling_state = state["sampling_state"]

    def _init_rng(self):
        """Per-rank RNGs, seeded from the run seed (not from the global RNG, which checkpoints do not keep)."""
        if self.generator is None:
            rank = self.global_rank if self._trainer is not None else 0
            self.generator = torch.Generator().manual_seed(self.seed * 1009 + rank)
            self.sampling_state = torch.Generator().manual_seed(self.seed * 1009 + rank + 7).get_state()

    @contextlib.contextmanager
    def sampling_rng(self):
        """`generate` samples from torch's global RNG: run it from the stage's own saved state."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            state = self.sampling_state
            torch.set_rng_state(state["cpu"] if isinstance(state, dict) else state)
            if cuda and isinstance(state, dict) and "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"], self.device)
            yield
            self.sampling_state = torch.get_rng_state()
            if cuda:
                self.sampling_state = {"cpu": self.sampling_state, "cuda": torch.cuda.get_rng_state(self.device)}

    # ------------------------------------------------------------------ rollout
    def completion_logprobs(self, model, ro: dict, idx, entropy: bool = False):
        """log pi(completion token t) under logits / temperature (the sampling distribution, as TRL) of the
        rollout rows `idx` -> (n, R); with `entropy`, also the per-token entropy (n, R) (no grad). The prompt
        runs once per group when the model allows it (stages/shared_prefix.py: the same numbers)."""
        P = ro["prompt_width"]
        if self.share_prompt and can_share_prompt(model):
            logits = shared_prompt_logits(model, ro["prompt_ids"][idx], ro["prompt_mask"][idx], ro["completions"][idx],
                                          ro["attention_mask"][idx], ro["position_ids"][idx], idx // self.G,
                                          self.temperature)
        else:
            logits = full_logits(model, ro["input_ids"][idx], ro["attention_mask"][idx], ro["position_ids"][idx], P,
                                   self.temperature)
        return logprobs_and_entropy(logits, ro["completions"][idx], entropy)

    @torch.no_grad()
    def sample_groups(self, batch) -> dict:
        """G completions per prompt of `batch`, decoded and scored (no log-probs yet)."""
        G, pad = self.G, self.tokenizer.pad_token_id
        eos = model_stop_ids(self.model, self.tokenizer)  # every end-of-turn / EOS id
        base_ids, base_mask = batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device)  # (B, P)
        prompt_ids, prompt_mask = base_ids.repeat_interleave(G, 0), base_mask.repeat_interleave(G, 0)  # (N, P)
        was_training = self.model.training
        self.model.eval()
        with generation_context(self.model, self.trainer.strategy if self._trainer else None) as extra, \
                self.sampling_rng():
            if self.share_prompt and can_share_prompt(self.model):  # prefill each distinct prompt once
                extra = {**extra, "past_key_values": prefill_prompts(self.model, base_ids, base_mask, G)}
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                                      max_new_tokens=self.max_completion_length, pad_token_id=pad,
                                      eos_token_id=eos, **self.generation, **extra)  # (N, P + R)
        self.model.train(was_training)
        completions = out[:, prompt_ids.shape[1]:]  # (N, R)
        N = completions.shape[0]
        budget = torch.full((N,), self.max_completion_length)
        mask = response_mask(completions, budget, eos)  # (N, R): up to and including the first stop id
        completions = torch.where(mask, completions, pad)
        lengths = mask.sum(1)  # (N,)
        has_eos = (torch.isin(completions, torch.tensor(eos, device=completions.device)) & mask).any(1)  # (N,)
        truncated = ~has_eos
        texts = self.tokenizer.batch_decode([c[m] for c, m in zip(completions, mask)], skip_special_tokens=True)
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        answers = [a for a in batch["answers"] for _ in range(G)]
        total, per_fn = self.rewards(prompts, texts, answer=answers, completion_tokens=lengths.tolist(),
                                     truncated=truncated.tolist())
        if self.overlong_buffer:
            per_fn["overlong"] = self.overlong_penalty_factor * soft_overlong_penalty(
                lengths.cpu(), self.max_completion_length, self.overlong_buffer)
            total = total + per_fn["overlong"]
        return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completions=completions, mask=mask,
                    truncated=truncated, texts=texts, rewards=total.to(self.device),
                    per_fn={k: v.to(self.device) for k, v in per_fn.items()})

    def refill_batch(self, n: int) -> dict:
        """n fresh training prompts drawn with the stage's generator (deterministic, resumable)."""
        dm = self.trainer.datamodule
        idx = torch.randint(len(dm.train_set), (n,), generator=self.generator).tolist()
        return dm.format.collate([dm.train_set[i] for i in idx])

    def collect(self, batch) -> tuple[dict, int, float]:
        """The rollout's groups: with dynamic sampling, zero-variance groups are replaced by groups of new
        prompts (rounds capped, the same number on every rank: generation may be collective).
        Returns (groups, refill rounds, share of zero-variance groups in the first sample)."""
        G, B = self.G, batch["prompt_ids"].shape[0]
        groups = self.sample_groups(batch)
        zero = zero_variance_groups(groups["rewards"].cpu(), G)  # (B,)
        zero_share = float(zero.float().mean())
        if not self.dynamic_sampling:
            return groups, 0, zero_share
        kept, dropped, rounds = [self._select(groups, ~zero)], [self._select(groups, zero)], 0
        have = int((~zero).sum())
        while rounds < self.max_refill_rounds and sum_over_ranks(self, max(0, B - have)) > 0:
            rounds += 1
            more = self.sample_groups(self.refill_batch(B))
            z = zero_variance_groups(more["rewards"].cpu(), G)
            kept.append(self._select(more, ~z))
            dropped.append(self._select(more, z))
            have += int((~z).sum())
        merged = self._concat(kept + dropped)  # varied groups first; dropped ones only to fill the batch
        return self._select(merged, torch.arange(len(merged["texts"]) // G) < B), rounds, zero_share

    def _select(self, groups: dict, keep: torch.Tensor) -> dict:
        rows = keep.repeat_interleave(self.G)  # (N,) group mask -> row mask
        rows_dev = rows.to(self.device)
        out = {}
        for k, v in groups.items():
            if k == "per_fn":
                out[k] = {n: t[rows_dev] for n, t in v.items()}
            elif k == "texts":
                out[k] = [t for t, r in zip(v, rows.tolist()) if r]
            else:
                out[k] = v[rows_dev] if v.device == rows_dev.device else v[rows]
        return out

    def _concat(self, parts: list[dict]) -> dict:
        out = {}
        width = max(p["completions"].shape[1] for p in parts)
        pwidth = max(p["prompt_ids"].shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id
        for k in parts[0]:
            if k == "per_fn":
                out[k] = {n: torch.cat([p[k][n] for p in parts]) for n in parts[0][k]}
            elif k == "texts":
                out[k] = [t for p in parts for t in p[k]]
            elif k in ("completions", "mask"):  # right-padded: pad on the right
                fill = pad if k == "completions" else False
                out[k] = torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[1]), value=fill)
                                    for p in parts])
            elif k in ("prompt_ids", "prompt_mask"):  # left-padded: pad on the left
                fill = pad if k == "prompt_ids" else 0
                out[k] = torch.cat([torch.nn.functional.pad(p[k], (pwidth - p[k].shape[1], 0), value=fill)
                                    for p in parts])
            else:
                out[k] = torch.cat([p[k] for p in parts])
        return out

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages (N,); `scale_rewards=batch` uses the std over all ranks' rollouts."""
        if self.scale_rewards == "batch" and self._trainer is not None and self.trainer.world_size > 1:
            every = self.all_gather(rewards)  # (world, N)
            adv, _ = group_advantages(every.reshape(-1), self.G, "batch")
            return adv.view(every.shape)[self.global_rank]
        return group_advantages(rewards, self.G, self.scale_rewards)[0]

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        self._init_rng()
        t0 = time.perf_counter()
        ro, rounds, zero_share = self.collect(batch)
        t_generate = time.perf_counter() - t0
        P = ro["prompt_ids"].shape[1]
        ro["input_ids"] = torch.cat([ro["prompt_ids"], ro["completions"]], 1)  # (N, P + R)
        ro["attention_mask"] = torch.cat([ro["prompt_mask"], ro["mask"].long()], 1)
        ro["position_ids"] = position_ids_from_mask(ro["attention_mask"])
        ro["loss_mask"] = ro["mask"] & ~ro["truncated"].unsqueeze(1) if self.mask_truncated else ro["mask"]
        ro["advantages"] = self.advantages(ro["rewards"])
        ro["prompt_width"], ro["refill_rounds"], ro["zero_std_share"] = P, rounds, zero_share
        # old log-probs: needed when the policy moves within the rollout (several passes or mini-batches);
        # otherwise the update's own log-probs, detached, are the same numbers (ratio 1)
        ro["old_logprobs"] = None
        if self.steps_per_iteration > 1:
            was_training = self.model.training
            self.model.train()  # dropout is off: the same numbers as the update's forward
            ro["old_logprobs"] = torch.cat([self.completion_logprobs(self.model, ro, i)
                                            for i in self._split(len(ro["texts"]))])
            self.model.train(was_training)
        ro["ref_logprobs"] = None
        if self.beta:
            with self.reference.model() as ref:
                ro["ref_logprobs"] = torch.cat([self.completion_logprobs(ref, ro, i)
                                                for i in self._split(len(ro["texts"]))])
        ro["t_generate"], ro["t_rollout"] = t_generate, time.perf_counter() - t0
        return ro

    def _split(self, n: int):
        return torch.arange(n, device=self.device).split(self.micro_batch_size)

    # ------------------------------------------------------------------ update
    def policy_update(self, ro: dict) -> dict:
        """num_iterations passes over shuffled mini-batches; each mini-batch is one optimizer step,
        accumulated over micro-batches with step-global normalisers (losses/grpo.aggregate)."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        N = len(ro["texts"])
        mask = ro["loss_mask"]
        steps_per_pass = math.ceil(N / self.mini_batch_size)
        world = self.trainer.world_size if self._trainer is not None else 1
        dapo_tokens = sum_over_ranks(self, mask.sum()) / steps_per_pass
        stats = {k: [] for k in ("loss", "clip_low", "clip_high", "kl", "entropy")}
        self.model.train()
        for _ in range(self.num_iterations):
            order = torch.randperm(N, generator=self.generator).to(self.device)
            for mini in order.split(self.mini_batch_size):
                counts = StepCounts(sequences=sum_over_ranks(self, len(mini)),
                                    tokens=sum_over_ranks(self, mask[mini].sum()), dapo_tokens=dapo_tokens,
                                    max_completion_length=self.max_completion_length, world_size=world)
                optimizer.zero_grad()
                for idx in mini.split(self.micro_batch_size):
                    loss, st = self.micro_batch_loss(ro, idx, counts, want_entropy=not stats["entropy"])
                    self.manual_backward(loss)
                    stats["loss"].append(float(loss.detach()))
                    for k, v in st.items():
                        stats[k].append(float(v))
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    def micro_batch_loss(self, ro: dict, idx, counts: StepCounts, want_entropy: bool = False):
        out = self.completion_logprobs(self.model, ro, idx, entropy=want_entropy)
        logprobs, entropy = out if want_entropy else (out, None)
        old = ro["old_logprobs"][idx] if ro["old_logprobs"] is not None else logprobs.detach()
        ref = ro["ref_logprobs"][idx] if ro["ref_logprobs"] is not None else None
        mask = ro["loss_mask"][idx]
        per_token, stats = grpo_token_loss(logprobs, old, ro["advantages"][idx], mask, self.epsilon,
                                           self.epsilon_high, self.is_level, ref, self.beta)
        if entropy is not None:
            m = ro["mask"][idx]
            stats["entropy"] = torch.where(m, entropy, 0.0).sum() / m.sum().clamp(min=1)
        return aggregate(per_token, mask, self.loss_type, counts), stats

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        ro = self.rollout(batch)
        stats = self.policy_update(ro)
        rewards, mask = ro["rewards"], ro["mask"]
        lengths = mask.sum(1).float()
        reward_mean = mean_over_ranks(self, float(rewards.mean()))
        kl = mean_over_ranks(self, stats["kl"]) if "kl" in stats else None
        self.history.append({"reward": reward_mean, "kl": kl})
        total = time.perf_counter() - t0
        metrics = {
            "train/reward_std": float(rewards.std()),
            **{f"train/reward_{name}": float(v.mean()) for name, v in ro["per_fn"].items()},
            "train/zero_std_groups": ro["zero_std_share"], "train/refill_rounds": float(ro["refill_rounds"]),
            "train/completion_length": float(lengths.mean()), "train/completion_length_max": float(lengths.max()),
            "train/truncated": float(ro["truncated"].float().mean()),
            "train/generate_share": ro["t_generate"] / total, "train/samples_per_sec": len(ro["texts"]) / total,
            **{f"train/{k}": v for k, v in stats.items()},
        }
        self.log("train/reward_mean", reward_mean, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)
        batch["attention_mask"] = ro["attention_mask"]  # rollout tokens count for tokens/s
        self.stop_if_no_room()

    def validation_step(self, batch, batch_idx):
        answers = greedy_answers(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                 self.val_max_new_tokens)
        lengths = [len(ids) + 1 for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]  # + EOS
        score, _ = self.rewards(batch["prompts"], answers, answer=batch["answers"], completion_tokens=lengths,
                                truncated=[n > self.val_max_new_tokens for n in lengths])
        log_answer_validation(self, answers, score, batch["answers"])

    def summary_values(self, summary: dict) -> dict:
        if not self.history:
            return {}
        first, last = first_and_last_tenth(self.history)
        kls = [r["kl"] for r in last if r["kl"] is not None]
        return {"reward_mean_first": sum(r["reward"] for r in first) / len(first),
                "reward_mean_last": sum(r["reward"] for r in last) / len(last),
                "kl_last": sum(kls) / len(kls) if kls else None, "grpo_iterations": len(self.history)}
