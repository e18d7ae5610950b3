"""Typed, bounded values: the one reading of a setting as a number, an integer or a switch, each refusal a
one-line ConfigError that names the setting and an example.
"""
from __future__ import annotations

from llmlab.errors import ConfigError, PipelineError


def number(value, setting: str, example: str) -> float:
    """A numeric setting as float; ConfigError naming it when it is text or null."""
    if isinstance(value, bool):
        value = None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}={value!r} is not a number; e.g. {setting}={example}") from None


def override_list(value, setting: str) -> list[str]:
    """A list of `key=value` overrides (a bare string would be split into characters)."""
    from omegaconf import ListConfig

    if value is None:
        return []
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(o, str) and "=" in o for o in value):
        raise PipelineError(f"{setting}={value}: give a list of llmlab.run overrides, e.g. "
                            f"{setting}=\"['trainer.max_steps=10','data.batch_size=8']\"")
    return [str(o) for o in value]
