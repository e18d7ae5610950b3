"""Evaluation: the lm-eval bridge and task YAMLs, the pipeline comparison, every generation path, metrics."""
