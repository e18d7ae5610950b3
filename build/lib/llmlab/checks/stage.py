"""The stage group's rules (config alone): the stage name, optimizer and schedule numbers
(`check_optimization`), PPO's response budget and rule reward, GRPO's settings, the reward group of the online
RL stages (`check_stage_settings`). The preference stages' losses and data are preference.py; resume and
ckpt_path are top-level settings (settings.py); strategy.load_full_weights is strategy.py.
"""
from __future__ import annotations

from llmlab.checks.settings import number
from llmlab.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "kto", "orpo", "simpo")


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


SCALE_REWARDS = ("group", "batch", "none")


IS_LEVELS = ("token", "sequence")


SCHEDULES = ("cosine", "linear", "constant")


def check_stage_name(cfg) -> None:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage={cfg.stage.name!r}: use one of {STAGES}")


def check_optimization(cfg) -> None:
    """stage.module.optimizer.lr and the warmup schedule of llmlab.optim."""
    module = cfg.stage.get("module") or {}
    opt = module.get("optimizer") or {}
    if "lr" in opt:
        lr = number(opt.lr, "stage.module.optimizer.lr", "3e-4")
        if not lr > 0 or lr != lr or lr == float("inf"):
            raise ConfigError(f"stage.module.optimizer.lr={opt.lr}: the learning rate must be a positive number, "
                              f"e.g. stage.module.optimizer.lr=3e-4")
    if "weight_decay" in opt and number(opt.weight_decay, "stage.module.optimizer.weight_decay", "0.01") < 0:
        raise ConfigError(f"stage.module.optimizer.weight_decay={opt.weight_decay}: must be >= 0")
    sched = module.get("scheduler") or {}
    if str(sched.get("_target_", "")) == "llmlab.optim.warmup_schedule":
        name = sched.get("name", "cosine")
        if name not in SCHEDULES:
            raise ConfigError(f"stage.module.scheduler.name={name!r}: use one of {', '.join(SCHEDULES)}")
        warmup = sched.get("warmup_steps", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"stage.module.scheduler.warmup_steps={warmup!r}: give an integer >= 0")
        ratio = number(sched.get("min_lr_ratio", 0.0), "stage.module.scheduler.min_lr_ratio", "0.1")
        if not 0 <= ratio <= 1:
            raise ConfigError(f"stage.module.scheduler.min_lr_ratio={ratio}: give a fraction in [0, 1]")


def response_length_bounds(value) -> tuple[int, int]:
    """(min, max) tokens per PPO response from stage.module.response_length=[min, max], 1 <= min <= max."""
    from omegaconf import ListConfig

    ok = isinstance(value, (list, tuple, ListConfig)) and len(value) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value) and 1 <= value[0] <= value[1]
    if not ok:
        raise ConfigError(f"stage.module.response_length={value}: give [min, max] token budgets with 1 <= "
                          f"min <= max, e.g. stage.module.response_length=[8,16]")
    return int(value[0]), int(value[1])


def check_grpo_args(num_generations, batch_size, mini_batch_size, micro_batch_size, loss_type, scale_rewards,
                    importance_sampling_level, num_iterations, temperature) -> None:
    """GRPOModule's settings (its constructor runs this too; here before torch is imported)."""
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ConfigError(f"stage.module.num_generations={num_generations}: GRPO compares completions within a "
                          f"group, it needs >= 2 per prompt; e.g. stage.module.num_generations=8")
    n = batch_size * num_generations if batch_size else None
    for key, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
        if value is not None and (value < 1 or (n and n % value)):
            raise ConfigError(f"stage.module.{key}={value}: a rollout of {batch_size} prompts x {num_generations} "
                              f"completions = {n} must divide into batches of {key}; use a divisor of {n} or null")
    if micro_batch_size and mini_batch_size and mini_batch_size % micro_batch_size:
        raise ConfigError(f"stage.module.micro_batch_size={micro_batch_size} must divide "
                          f"stage.module.mini_batch_size={mini_batch_size}")
    for key, value, allowed in (("loss_type", loss_type, GRPO_LOSS_TYPES), ("scale_rewards", scale_rewards, SCALE_REWARDS),
                                ("importance_sampling_level", importance_sampling_level, IS_LEVELS)):
        if value not in allowed:
            raise ConfigError(f"stage.module.{key}={value}: use one of {', '.join(allowed)}")
    if num_iterations < 1:
        raise ConfigError(f"stage.module.num_iterations={num_iterations}: passes over each rollout, need >= 1")
    if temperature <= 0:
        raise ConfigError(f"stage.module.temperature={temperature}: rollouts sample, need > 0")


def _module_exists(path: str) -> bool:
    import importlib.util

    mod = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    try:
        return bool(mod) and importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def check_reward_settings(cfg) -> None:
    """The `reward` group (grpo, ppo): every entry's target and function module can be found."""
    from omegaconf import OmegaConf

    group = cfg.get("reward") or {}
    missing = sorted(OmegaConf.missing_keys(group)) if group else []
    if missing:
        key = missing[0] if missing[0].startswith("reward.") else f"reward.{missing[0]}"
        raise ConfigError(f"{key}: has no value (???); set it, e.g. {key}=<value>")
    for name in group:
        node = group[name]
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if not target:
            raise ConfigError(f"reward.{name}: needs a _target_ (a reward class or function path), e.g. reward=task")
        if not _module_exists(str(target)):
            raise ConfigError(f"reward.{name}._target_={target}: no such module to import")
        fn = node.get("fn") if not OmegaConf.is_missing(node, "fn") else None
        if fn is not None and not _module_exists(str(fn)):
            raise ConfigError(f"reward.{name}.fn={fn}: no such module to import; give module:function (on "
                              f"PYTHONPATH) with signature (prompts, completions, **fields) -> list[float]")


def check_stage_settings(cfg) -> None:
    """PPO's response budget and rule reward, the reward group (grpo, ppo), GRPO's settings and its optimizer
    stepping (trainer.accumulate_grad_batches=1)."""
    import importlib.util

    module = cfg.stage.get("module") or {}
    if cfg.stage.name == "ppo":
        if "response_length" in module:
            response_length_bounds(module.response_length)
        rule = module.get("rule_reward")
        if rule and not module.get("reward_model"):
            mod, _, fn = str(rule).rpartition(".")
            try:
                found = bool(mod and fn) and importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ConfigError(f"stage.rule_reward={rule}: no such module to import; give the dotted path of a "
                                  f"function(response, answer) -> float, e.g. llmlab.data.builtin.rule_reward")
    if cfg.stage.name in ("grpo", "ppo"):
        check_reward_settings(cfg)
    if cfg.stage.name == "grpo":
        m = module
        check_grpo_args(m.get("num_generations"), cfg.data.get("batch_size"), m.get("mini_batch_size"),
                        m.get("micro_batch_size"), m.get("loss_type"), m.get("scale_rewards"),
                        m.get("importance_sampling_level"), int(m.get("num_iterations") or 1),
                        float(m.get("temperature") or 1.0))
        if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
            raise ConfigError("stage=grpo steps its optimizer per mini-batch itself: set "
                              "trainer.accumulate_grad_batches=1 (use stage.module.micro_batch_size)")
