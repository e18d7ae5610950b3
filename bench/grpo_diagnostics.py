"""Per-rollout diagnostics of stage=grpo (bench/RESULTS.md "grpo learning: diagnosis"): a GRPOModule subclass
that appends one JSON line per rollout to $DIAG_LOG: reward mean, share of zero-variance groups, mean |A|,
completion tokens, grad norm before clipping (per optimizer step), how far the policy moved on the rollout's
own tokens (k3 KL of new vs old log-probs after the update, max |delta log p|), the share of sampled
completions that are exactly right, entropy, generate/rollout seconds.

    DIAG_LOG=/tmp/d.jsonl PYTHONPATH=.:bench python -m llmlab.run stage=grpo \
        stage.module._target_=grpo_diagnostics.DiagGRPO seed=1234 [overrides]

Costs two extra no-grad forwards per rollout; not for timing."""
import json
import os

import torch

from llmlab.stages.grpo import GRPOModule

LOG = os.environ.get("DIAG_LOG", "grpo_diagnostics.jsonl")


class DiagGRPO(GRPOModule):
    def policy_update(self, ro):
        rows = torch.arange(len(ro["texts"]), device=self.device)
        with torch.no_grad():
            before = self.completion_logprobs(self.model, ro, rows)  # (N, R)
        norms, clip = [], self.clip_gradients

        def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return clip(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

        self.clip_gradients = clip_and_record
        stats = super().policy_update(ro)
        del self.clip_gradients
        with torch.no_grad():
            after = self.completion_logprobs(self.model, ro, rows)
        d = (before - after)[ro["mask"]]  # log old - log new on the sampled tokens
        adv = ro["advantages"]
        record = dict(step=len(self.history), reward=float(ro["rewards"].mean()), zero=ro["zero_std_share"],
                      abs_adv=float(adv.abs().mean()), tokens=float(ro["mask"].sum(1).float().mean()),
                      grad_norm=norms, kl_move=float((torch.exp(-d) - 1 + d).mean()), max_dlogp=float(d.abs().max()),
                      sampled_exact=float((ro["rewards"] >= 0.999).float().mean()), entropy=stats.get("entropy"),
                      t_gen=ro["t_generate"], t_ro=ro["t_rollout"])
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        return stats
