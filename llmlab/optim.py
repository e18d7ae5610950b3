"""Optimizer parameter groups and learning-rate schedules (warmup + cosine / linear / constant)."""
from __future__ import annotations

import logging
import math
import types

import torch
import torch.distributed as dist

log = logging.getLogger("llmlab")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms and 1-D params get no weight decay (as GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Multiplier of the base lr at a step: linear warmup to 1, then decay to min_lr_ratio."""
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        elif name == "linear":
            shape = 1 - progress
        else:  # constant
            shape = 1.0
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return schedule


def warmup_schedule(optimizer, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                    min_lr_ratio: float = 0.0):
    if name not in ("cosine", "linear", "constant"):
        raise ValueError(f"stage.scheduler.name={name!r}: use cosine, linear or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps, min_lr_ratio))


# --------------------------------------------------------------------------------------------------
# Non-finite guard: an update whose loss or gradients are NaN/inf is skipped, on every rank together
# --------------------------------------------------------------------------------------------------


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """True when every gradient the optimizer would apply has a finite norm.

    A norm is NaN/inf when any element is (or when finite values overflow it: also not worth applying);
    a per-tensor norm costs no gradient-sized temporary, unlike `isfinite(g).all()`. One `_foreach_norm`
    per device (fp32 norms, as `clip_grad_norm_` groups them) instead of a Python call per tensor: on the
    0.8M-parameter nanoGPT recipe (52 tensors) the guard was ~1% of a step (bench/RESULTS.md nanogpt_shakespeare).
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                by_device.setdefault(p.grad.device, []).append(p.grad)
    with torch.no_grad():
        return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))).all())
                   for grads in by_device.values())


def any_rank(flag: bool) -> bool:
    """`flag` OR-ed over all processes (all-reduce MAX), so every rank takes the same decision.

    Collective when torch.distributed is initialized (DDP, DeepSpeed): every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class StepGuard:
    """Decides, once per optimizer step and identically on all ranks, whether to skip the update.

    Installed on the base torch optimizer by `guard_optimizer`, because its `step()` is where every
    strategy passes with the gradients in `p.grad`: Lightning calls it after backward and clipping
    (auto, ddp, cpu_bf16, manual optimization), DeepSpeed ZeRO 1-3 with each rank's fp32 partition.
    A skipped update returns without touching weights or optimizer state (Adam moments and step count
    stay), so weights can never become non-finite; Lightning still counts the step (global_step, LR
    schedule and the data position advance, so resume stays exact).

    ZeRO calls the base step once per parameter (sub-)group within one optimizer step, each group's
    gradients made just before its call; the callback (`llmlab.callbacks.nonfinite.NonFiniteGuard`)
    opens a step window (`begin_step`) so the collective decision taken at the first call holds for
    the rest of that step (same all-reduce count on every rank). A later group that still turns out
    non-finite is not applied on that rank. DeepSpeed's own global-norm check (on by default in fp32)
    drops such steps before any group. Without a window each call is one step.
    """

    def __init__(self):
        self.skipped = 0          # optimizer steps skipped so far
        self.bad_streak = 0       # skipped steps in a row, up to the last finished step
        self.loss_bad = False     # a micro-batch loss of the current step was NaN/inf (note_loss)
        self._open = False        # inside a step window opened by begin_step
        self._decision = None     # this step's decision once taken: True = skip

    def note_loss(self, loss) -> None:
        """Record a micro-batch loss (called before its backward); a non-finite one spoils the step."""
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            self.loss_bad = True

    def begin_step(self) -> None:
        """An optimizer step starts: its decision is taken at the first base `step()` call."""
        self._open, self._decision = True, None

    def should_skip(self, optimizer: torch.optim.Optimizer) -> bool:
        """Skip this update? Collective (all-reduce) the first time it is asked within a step."""
        if self._decision is None:
            self._decision = any_rank(self.loss_bad or not grads_finite(optimizer))
        elif not self._decision and not grads_finite(optimizer):
            # a later ZeRO group of a step decided "apply" went non-finite (DeepSpeed's own norm check
            # off): never apply NaN, but keep the step's collective decision (and counts) as it is
            log.warning("non-finite gradients in a later parameter group of an applied step: that group's "
                        "update is skipped on this rank only")
            return True
        decision = self._decision
        if not self._open:  # no window: each call is a step of its own
            self._finish(decision)
        return decision

    def end_step(self, skipped_elsewhere: bool = False) -> bool:
        """Close the step window; returns whether the step was skipped.

        `skipped_elsewhere`: the strategy skipped the update before reaching the base `step()`
        (DeepSpeed does on a non-finite global gradient norm), so no decision was taken here.
        """
        skipped = self._decision if self._decision is not None else bool(skipped_elsewhere)
        self._open = False
        self._finish(skipped)
        return skipped

    def _finish(self, skipped: bool) -> None:
        self.skipped += int(skipped)
        self.bad_streak = self.bad_streak + 1 if skipped else 0
        self._decision, self.loss_bad = None, False


def guard_optimizer(optimizer: torch.optim.Optimizer, guard: StepGuard | None = None) -> StepGuard:
    """Wrap `optimizer.step` so a non-finite update is skipped (see StepGuard); returns the guard.

    The wrapper is bound to the optimizer (a method, as LR schedulers expect of `optimizer.step`).
    Lightning passes a closure (forward + backward + clipping): it runs first, then the decision.
    """
    guard = guard or StepGuard()
    original = optimizer.step

    def step(self, closure=None, **kwargs):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if guard.should_skip(self):
            return loss
        original(**kwargs)
        return loss

    optimizer.step = types.MethodType(step, optimizer)
    optimizer.llmlab_step_guard = guard
    return guard
