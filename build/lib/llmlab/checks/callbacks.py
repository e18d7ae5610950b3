"""The callbacks group's rules (config alone, no torch): an lm-eval callback in `callbacks`
(conf/callbacks/with_eval.yaml) names a task set that exists, whose tasks lm-eval knows and can reach (hub
task sets offline are refused), and runs at a multiple of trainer.val_check_interval (`check_eval_callbacks`).
The task-set checks themselves are llmlab.evaluation.harness.check_task_set (`python -m llmlab.eval` runs them too).
"""
from __future__ import annotations

from llmlab.errors import ConfigError


def check_eval_callbacks(cfg) -> None:
    """llmlab.run: an LMEvalCallback in `callbacks` is checked with the config alone (no torch), so a
    typo'd task or a hub task set offline fails in seconds, not after the model and data are built."""
    from llmlab.evaluation.harness import check_task_set, load_task_set

    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or not str(node.get("_target_", "")).endswith("LMEvalCallback"):
            continue
        task_set = load_task_set(node.get("task_set", "builtin"), f"callbacks.{name}.task_set")
        if node.get("text_file"):
            task_set.text_file = node.text_file
        check_task_set(task_set, f"callbacks.{name}.task_set={task_set.get('name')}")
        every, interval = node.get("every_n_steps"), cfg.trainer.get("val_check_interval")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"callbacks.{name}.every_n_steps={every!r}: give an integer >= 1 (a multiple of "
                              f"trainer.val_check_interval) or null (every validation)")
        if every and isinstance(interval, int) and every % interval:
            raise ConfigError(f"callbacks.{name}.every_n_steps={every}: it runs after a validation, so give a "
                              f"multiple of trainer.val_check_interval={interval}")
