"""What each Lightning `trainer.precision` means in dtypes: the one map every rule and estimate reads.

No torch import (config checks use it before torch loads); dtypes are names (`getattr(torch, name)`).
"""
from __future__ import annotations

from typing import Any

# precision -> (dtype Lightning keeps floating parameters in, dtype autocast computes in or None).
# "bf16" and "16" are Lightning's old names for the -mixed modes (its connector maps them so).
PRECISIONS: dict[str, tuple[str | None, str | None]] = {
    "64-true": ("float64", None), "64": ("float64", None),
    "32-true": ("float32", None), "32": ("float32", None),
    "bf16-true": ("bfloat16", None),
    "bf16-mixed": (None, "bfloat16"), "bf16": (None, "bfloat16"),
    "16-true": ("float16", None),
    "16-mixed": (None, "float16"), "16": (None, "float16"),
}


def _entry(precision: Any) -> tuple[str | None, str | None]:
    return PRECISIONS.get(str(precision), ("float32", None))


def weights_dtype(precision: Any) -> str | None:
    """The dtype `-true` precisions cast floating parameters to; None for `-mixed` (weights stay as built)."""
    return _entry(precision)[0]


def autocast_dtype(precision: Any) -> str | None:
    """The dtype `-mixed` precisions compute matmuls in under autocast; None for `-true`."""
    return _entry(precision)[1]


def half_dtype(precision: Any) -> str | None:
    """The 16-bit dtype a precision computes in (bfloat16 / float16, mixed or true), else None."""
    dtype = autocast_dtype(precision) or weights_dtype(precision)
    return dtype if dtype in ("bfloat16", "float16") else None


def parameter_dtype(precision: Any) -> str:
    """The dtype DeepSpeed keeps floating parameters in: it casts the module to bf16/fp16 for every
    16-bit precision (mixed too: DeepSpeed's own bf16/fp16 mode) and keeps fp32 otherwise."""
    return half_dtype(precision) or "float32"
