"""Stage `ppo`: RLHF with proximal policy optimisation (Schulman et al. 2017; Ziegler et al. 2019).

One training step is one PPO iteration on a batch of B prompts:

1. rollout: sample `samples_per_prompt` responses per prompt with the KV cache (`generate`, at
   `temperature`), each with its own length budget drawn from `response_length` [min, max] (the
   course's LengthSampler); a response ends at EOS (included as an action) unless `stop_at_eos=false`.
   The policy PPO optimizes is the one sampled from: log-probs (ratio, KL, entropy) come from
   logits / temperature, for the policy and the reference alike (as TRL's PPO trainer);
2. score: reward per sequence from a reward model (`reward_model=` run dir or HF path, scoring the
   prompt + response text exactly as stage=rm trained it) or from a rule (`rule_reward=`, e.g. the
   built-in data's checkable reward) or from the `reward` group (llmlab/rewards.py); per-token log-probs of the policy and of the frozen reference
   (PEFT: adapter disabled; else a frozen copy) and values from the value head;
3. advantages: per-token reward = -kl_coef * (log pi - log ref) + score on the last token, the score
   minus the mean score of the prompt's other responses with `group_baseline` (RLOO's leave-one-out
   baseline, Ahmadian et al. 2024); GAE (gamma, lam); whitened advantages (option), optionally
   whitened rewards;
4. update: `ppo_epochs` passes over shuffled mini-batches, clipped policy loss + vf_coef * clipped
   value loss, one optimizer step per mini-batch (Lightning manual optimization); optional early
   stop of the epochs when the approximate KL to the rollout policy passes 1.5 * target_kl;
5. the adaptive KL controller moves kl_coef toward its target KL.

Step counting: Lightning counts every mini-batch optimizer step, so `trainer.max_steps` and
`trainer.val_check_interval` are optimizer steps here too (an iteration is
ppo_epochs * ceil(B * samples_per_prompt / mini_batch_size) of them); the last iteration that fits
ends with a validation.
Validation: greedy answers to held-out prompts -> `val/reward_mean` (and `val/exact_match` when the
data has reference answers). summary.json: `reward_mean_first` / `reward_mean_last` (mean rollout
reward over the first / last tenth of the iterations), `kl_last` (mean KL over the last tenth).
The value head is a linear layer on the policy's last hidden state (shared trunk, as TRL's
AutoModelForCausalLMWithValueHead; `value_head_detach=true` keeps the value loss off the trunk);
`hf/` holds the policy alone.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from torchmetrics import MeanMetric

from llmlab.checks.stage import response_length_bounds
from llmlab.errors import ConfigError
from llmlab.evaluation.generation import (
    generation_context,
    greedy_answers,
    model_stop_ids,
)
from llmlab.evaluation.metrics import ExactMatch
from llmlab.losses import (
    AdaptiveKLController,
    entropy_from_logits,
    gae_advantages,
    kl_penalized_rewards,
    leave_one_out_centered,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
from llmlab.rewards import ModelReward, Rewards, RuleReward, build_rewards
from llmlab.stages import alignment
from llmlab.stages.alignment import FrozenReference, load_reference
from llmlab.stages.common import (
    configure_optimizers,
    first_and_last_tenth,
    log_answer_validation,
    mean_over_ranks,
    position_ids_from_mask,
)
from llmlab.stages.interface import RolloutStage

log = logging.getLogger("llmlab")


# ---------------------------------------------------------------------------------------- model parts
class ValueHead(nn.Module):
    """V(s_t): a linear layer on the last hidden state, (B, T, H) -> (B, T).

    Starts at V = 0 (weight and bias zero): the first advantages are then the (group-centred) returns
    themselves, not returns minus random value-head noise of the same size as the reward; measured on
    the built-in task from tiny_sft_early, one seed each: reward gain +0.016 with the default init,
    +0.037 with zeros (conf/stage/ppo.yaml)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def last_hidden_size(model) -> int:
    """Width of the state the LM head reads (OPT-350m projects 1024 -> 512 before it)."""
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "in_features"):
        return head.in_features
    return model.config.hidden_size


def response_mask(responses: torch.Tensor, budgets: torch.Tensor, eos_id: int | list[int] | None) -> torch.Tensor:
    """(B, R) bool: the first budgets[b] tokens of each response, cut after its first stop token (kept); `eos_id`
    one id or several (`generation.model_stop_ids`: e.g. Llama 3's <|eot_id|> and <|end_of_text|>)."""
    B, R = responses.shape
    positions = torch.arange(R, device=responses.device).expand(B, R)
    end = budgets.to(responses.device).clamp(max=R)  # (B,)
    if eos_id is not None:
        is_eos = torch.isin(responses, torch.tensor(eos_id, device=responses.device).reshape(-1))  # (B, R)
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), R)  # (B,)
        end = torch.minimum(end, first_eos + 1)
    return positions < end.unsqueeze(1)


# ---------------------------------------------------------------------------------------- stage
class PPOModule(RolloutStage):
    data_format = "prompt"

    def __init__(self, model, tokenizer, optimizer, scheduler=None, *, reward_model: str | None = None,
                 rule_reward: str | None = None, reward=None, reward_batch_size: int = 16, reward_max_length: int = 512,
                 rollout_batch_size: int = 16, mini_batch_size: int = 4, ppo_epochs: int = 4,
                 response_length: tuple[int, int] = (8, 16), temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_at_eos: bool = True, gamma: float = 1.0, lam: float = 0.95,
                 clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1,
                 kl_controller=None, whiten_advantages: bool = True, whiten_rewards: bool = False,
                 target_kl: float | None = None, early_stopping: bool = False, max_grad_norm: float | None = 1.0,
                 reference_model: str | None = None, disable_dropout: bool = True,
                 value_head_detach: bool = False, samples_per_prompt: int = 1, group_baseline: bool = False,
                 val_max_new_tokens: int | None = None):
        super().__init__()
        self.automatic_optimization = False  # several PPO mini-batch steps per rollout
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # one reward source: the reward_model shortcut, else the `reward` group, else the rule_reward shortcut
        if reward_model:
            self.reward = Rewards({"model": ModelReward(reward_model, reward_batch_size, reward_max_length)})
        elif reward is not None:
            self.reward = reward if isinstance(reward, Rewards) else build_rewards(reward)
        elif rule_reward:
            self.reward = Rewards({"task": RuleReward(rule_reward)})
        else:
            raise ConfigError("stage=ppo needs a reward: stage.reward_model=<run dir or HF path>, "
                              "reward=<group entries> or stage.rule_reward=<function>")
        lo, hi = response_length_bounds(response_length)
        self.response_length = (lo, hi)
        self.rollout_batch_size, self.mini_batch_size, self.ppo_epochs = rollout_batch_size, mini_batch_size, ppo_epochs
        if temperature <= 0:
            raise ConfigError(f"stage.module.temperature={temperature}: rollouts sample, need > 0")
        self.temperature = float(temperature)
        self.generation = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        self.stop_at_eos = stop_at_eos
        self.gamma, self.lam, self.clip_range, self.clip_range_value = gamma, lam, clip_range, clip_range_value
        self.vf_coef, self.whiten_advantages, self.whiten_rewards = vf_coef, whiten_advantages, whiten_rewards
        self.kl_ctl = kl_controller if kl_controller is not None else AdaptiveKLController(0.2, 6.0, 10000)
        self.target_kl, self.early_stopping, self.max_grad_norm = target_kl, early_stopping, max_grad_norm
        self.val_max_new_tokens = val_max_new_tokens or hi
        if disable_dropout:
            alignment.disable_dropout(model)
        self.value_head = ValueHead(last_hidden_size(model))
        self.value_head_detach = value_head_detach  # True: the value loss trains the head only, not the trunk
        if samples_per_prompt < 1 or (group_baseline and samples_per_prompt < 2):
            raise ConfigError(f"stage.module.samples_per_prompt={samples_per_prompt}: need >= 1, and >= 2 with "
                              f"stage.module.group_baseline=true (the baseline is the mean of the other responses)")
        self.samples_per_prompt, self.group_baseline = samples_per_prompt, group_baseline
        ref = load_reference(reference_model, tokenizer) if reference_model else None
        self.reference = FrozenReference(model, ref)
        self.history: list[dict] = []  # per iteration: reward, kl (summary's first/last tenth)
        self.val_reward, self.val_exact_match = MeanMetric(), ExactMatch()
        self.generator = torch.Generator().manual_seed(0)  # response budgets and mini-batch order

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * math.ceil(self.rollout_batch_size * self.samples_per_prompt / self.mini_batch_size)

    def on_fit_start(self):
        super().on_fit_start()
        self.reward.to(self.device)

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ppo"] = {"kl_coef": self.kl_ctl.value, "history": self.history,
                             "generator": self.generator.get_state()}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("ppo") or {}
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)
        self.history = list(state.get("history", []))
        if "generator" in state:
            self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ forward passes
    def policy_forward(self, input_ids, attention_mask, position_ids):
        """Logits (B, T, V) and values (B, T) in one pass of the shared trunk."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]  # (B, T, H)
        return out.logits, self.value_head(hidden.detach() if self.value_head_detach else hidden)

    def response_logprobs(self, logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """log pi(response token t) under the distribution the rollout samples from: logits (B, T, V) divided
        by the sampling temperature (as TRL's PPO trainer), so the PPO ratio, the KL to the reference and
        the entropy are those of the sampling policy. -> (B, R)"""
        return token_logprobs(logits / self.temperature, input_ids)[:, prompt_width - 1:]

    @torch.no_grad()
    def rollout(self, batch) -> dict:
        k = self.samples_per_prompt  # responses per prompt: B = prompts * k episodes
        prompt_ids = batch["prompt_ids"].repeat_interleave(k, 0)  # (B, P)
        prompt_mask = batch["prompt_mask"].repeat_interleave(k, 0)
        prompts = [p for p in batch["prompts"] for _ in range(k)]
        answers = [a for a in batch["answers"] for _ in range(k)]
        B, P = prompt_ids.shape
        lo, hi = self.response_length
        budgets = torch.randint(lo, hi + 1, (B,), generator=self.generator)  # (B,) tokens per response
        eos = model_stop_ids(self.model, self.tokenizer)  # every end-of-turn / EOS id
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        # ZeRO-3: ranks stop sampling at different lengths; generate on gathered weights without
        # DeepSpeed's per-layer collectives (else a rank that finished early leaves the others hanging)
        with generation_context(self.model, self.trainer.strategy if self._trainer else None) as extra:
            generated = self.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=int(budgets.max()), use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
                # stop_at_eos=false: an id that never occurs, so only the budget ends a response (TRL's recipe)
                eos_token_id=eos if self.stop_at_eos else len(self.tokenizer) + 1,
                **self.generation, **extra)  # (B, P + R)
        t_generate = time.perf_counter() - t0
        responses = generated[:, P:]  # (B, R)
        mask = response_mask(responses, budgets, eos if self.stop_at_eos else None)  # (B, R)
        responses = torch.where(mask, responses, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode([r[m] for r, m in zip(responses, mask)], skip_special_tokens=True)
        score, per_fn = self.reward(prompts, texts, answer=answers)
        score = score.to(self.device).float()  # (B,)
        # group_baseline: minus the mean score of the prompt's other responses (RLOO's baseline)
        centered = leave_one_out_centered(score, k) if self.group_baseline else score  # (B,)

        input_ids = torch.cat([prompt_ids, responses], 1)  # (B, P + R)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        position_ids = position_ids_from_mask(attention_mask)
        logits, values = self.policy_forward(input_ids, attention_mask, position_ids)
        logprobs = self.response_logprobs(logits, input_ids, P)  # (B, R): log pi(response token t)
        values = values[:, P - 1:-1].float()  # (B, R): V of the state before token t
        entropy = masked_mean(entropy_from_logits(logits[:, P - 1:-1] / self.temperature), mask)
        del logits
        with self.reference.model() as ref:
            ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
            ref_logprobs = self.response_logprobs(ref_logits, input_ids, P)  # (B, R)
        del ref_logits
        self.model.train(was_training)

        rewards, kl = kl_penalized_rewards(centered, logprobs, ref_logprobs, mask, self.kl_ctl.value)  # (B, R)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, self.gamma, self.lam)  # (B, R)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, mask=mask,
                    prompt_width=P, logprobs=logprobs, values=values, advantages=advantages.detach(),
                    returns=returns, score=score, per_fn=per_fn, kl=kl.sum(1), entropy=entropy, texts=texts,
                    t_generate=t_generate, t_rollout=time.perf_counter() - t0)

    def ppo_update(self, ro: dict) -> dict:
        """`ppo_epochs` passes of clipped policy + value updates over shuffled mini-batches."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        P, B = ro["prompt_width"], ro["input_ids"].shape[0]
        stats = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl")}
        self.model.train()
        for _ in range(self.ppo_epochs):
            epoch_kl = []
            for idx in torch.randperm(B, generator=self.generator).split(self.mini_batch_size):
                idx = idx.to(self.device)
                logits, values = self.policy_forward(ro["input_ids"][idx], ro["attention_mask"][idx],
                                                     ro["position_ids"][idx])
                logprobs = self.response_logprobs(logits, ro["input_ids"][idx], P)  # (b, R)
                values = values[:, P - 1:-1].float()  # (b, R)
                mask = ro["mask"][idx]
                n_tokens = self.token_normalizer(mask)  # token mean over the global mini-batch
                pg_loss, clip_frac, approx_kl = ppo_policy_loss(logprobs, ro["logprobs"][idx], ro["advantages"][idx],
                                                                mask, self.clip_range, n_tokens)
                vf_loss, vf_clip_frac = ppo_value_loss(values, ro["values"][idx], ro["returns"][idx], mask,
                                                       self.clip_range_value, n_tokens)
                loss = pg_loss + self.vf_coef * vf_loss
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_frac", clip_frac),
                                   ("value_clip_frac", vf_clip_frac), ("approx_kl", approx_kl)):
                    stats[key].append(float(value.detach()))
                epoch_kl.append(float(approx_kl))
            if (self.early_stopping and self.target_kl
                    and mean_over_ranks(self, sum(epoch_kl) / len(epoch_kl)) > 1.5 * self.target_kl):
                break  # TRL's early stopping: the policy moved too far from the rollout policy
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    def token_normalizer(self, mask: torch.Tensor) -> torch.Tensor:
        """What a rank divides its token-loss sum by: the mini-batch's response tokens over all ranks /
        the number of ranks. DDP/ZeRO average the ranks' gradients, so the update is the token mean of
        the global mini-batch (as one big batch), not a mean of per-rank means. One rank: mask.sum().
        Collective (every rank calls it for every mini-batch)."""
        count = mask.sum().float()
        if self._trainer is None or self.trainer.world_size <= 1:
            return count
        return self.trainer.strategy.reduce(count, reduce_op="mean")

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        ro = self.rollout(batch)
        stats = self.ppo_update(ro)
        # several processes: every rank adapts the KL coefficient from the same (all-rank) mean
        kl_mean = mean_over_ranks(self, float(ro["kl"].mean()))
        self.kl_ctl.update(kl_mean, ro["input_ids"].shape[0])
        reward_mean = mean_over_ranks(self, float(ro["score"].mean()))
        self.history.append({"reward": reward_mean, "kl": kl_mean})
        total = time.perf_counter() - t0
        metrics = {
            "train/reward_mean": reward_mean,
            "train/reward_std": float(ro["score"].std()) if ro["score"].numel() > 1 else 0.0,
            **({f"train/reward_{k}": float(v.mean()) for k, v in ro["per_fn"].items()} if len(ro["per_fn"]) > 1 else {}),
            "train/kl": kl_mean,
            "train/kl_coef": float(self.kl_ctl.value),
            "train/entropy": float(ro["entropy"]),
            "train/response_length": float(ro["mask"].sum(1).float().mean()),
            "train/generate_share": ro["t_generate"] / total,
            "train/samples_per_sec": ro["input_ids"].shape[0] / total,
            **{f"train/{k}": v for k, v in stats.items()},
        }
        self.log("train/reward_mean", metrics.pop("train/reward_mean"), prog_bar=True)
        self.log_dict(metrics)
        batch["attention_mask"] = ro["attention_mask"]  # rollout tokens (prompt + response) count for tokens/s
        self.stop_if_no_room()

    def validation_step(self, batch, batch_idx):
        answers = greedy_answers(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                 self.val_max_new_tokens)
        score = self.reward(batch["prompts"], answers, answer=batch["answers"])[0].to(self.device).float()
        log_answer_validation(self, answers, score, batch["answers"])

    def summary_values(self, summary: dict) -> dict:
        if not self.history:
            return {}
        first, last = first_and_last_tenth(self.history)
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        return {"reward_mean_first": mean(first, "reward"), "reward_mean_last": mean(last, "reward"),
                "kl_last": mean(last, "kl"), "kl_coef_last": float(self.kl_ctl.value),
                "ppo_iterations": len(self.history)}
