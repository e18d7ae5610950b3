"""Search-space parsing and validation for the llmlab Optuna sweeper.

Not imported by Hydra's plugin scan (leading underscore); optuna is imported lazily.

Two ways to write a parameter (both in ``hydra.sweeper.params`` and, for the string form, on
the command line as a sweep override):

String form (Hydra's override grammar, as in hydra-optuna-sweeper):
    interval(1e-5, 1e-3)              float, uniform in [low, high]
    tag(log, interval(1e-5, 1e-3))    float, log-uniform
    range(4, 32, step=4)              int 4, 8, ..., 32 -- HIGH IS INCLUDED (Optuna's convention,
                                      same as hydra-optuna-sweeper; unlike the basic sweeper)
    range(0.1, 0.5, step=0.1)         float on a grid (any bound/step a float)
    tag(log, range(1, 64))            int, log-uniform (step must be 1)
    choice(8, 16, 32) / 8,16,32       categorical
    5                                 a fixed value (not searched)

Dict form:
    {type: float, low: 1e-5, high: 1e-3, log: true}
    {type: int, low: 4, high: 32, step: 4}
    {type: categorical, choices: [adamw, sgd]}
    a YAML list [a, b, c] is a categorical.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from hydra.errors import HydraException


class SearchSpaceError(HydraException):
    """An invalid search-space entry; the message names the parameter."""


@dataclass
class Param:
    name: str  # optuna parameter name, e.g. "optim.lr"
    key: str  # override key element, e.g. "optim.lr" or "+optim.lr"
    kind: str  # "float" | "int" | "categorical"
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: List[Any] = field(default_factory=list)
    # override-string form of each categorical choice (keeps the user's quoting)
    choice_strings: Dict[Any, str] = field(default_factory=dict)

    def distribution(self) -> Any:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(self.choices)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"choice({', '.join(self.choice_strings.get(c, format_value(c)) for c in self.choices)})"
        s = f"{self.kind}[{self.low}, {self.high}]"
        if self.step is not None:
            s += f" step={self.step}"
        if self.log:
            s += " log"
        return s

    def override(self, value: Any) -> str:
        if self.kind == "categorical" and value in self.choice_strings:
            return f"{self.key}={self.choice_strings[value]}"
        return f"{self.key}={format_value(value)}"

    def representative(self) -> Any:
        """A value inside the space (used to check that the config composes)."""
        return self.choices[0] if self.kind == "categorical" else self.low


_SAFE_STR = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:\-]*$")


def format_value(v: Any) -> str:
    """Python value -> Hydra override value string."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    if _SAFE_STR.match(s) and s.lower() not in ("null", "true", "false", "inf", "nan"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _err(name: str, msg: str) -> SearchSpaceError:
    return SearchSpaceError(f"llmlab_optuna: invalid search space for parameter '{name}': {msg}")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_numeric(p: Param) -> Param:
    name = p.name
    for label, v in (("low", p.low), ("high", p.high)):
        if not _is_num(v) or (isinstance(v, float) and not math.isfinite(v)):
            raise _err(name, f"{label}={v!r} must be a finite number")
    if p.low >= p.high:
        raise _err(name, f"low ({p.low}) must be < high ({p.high})")
    if p.log and p.low <= 0:
        raise _err(name, f"a log scale needs low > 0 (got low={p.low})")
    if p.step is not None:
        if not _is_num(p.step) or p.step <= 0:
            raise _err(name, f"step must be a positive number (got step={p.step!r})")
        if p.log and p.step != 1:
            raise _err(name, f"a log scale cannot have a step (got step={p.step})")
        span = p.high - p.low
        if p.step > span:
            raise _err(name, f"step ({p.step}) is larger than high - low ({span})")
        n = span / p.step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            ok_high = p.low + math.floor(n + 1e-9) * p.step
            raise _err(
                name,
                f"high - low ({span}) is not a multiple of step ({p.step}); "
                f"use e.g. high={ok_high:g}",
            )
        if p.kind == "float" and p.log:
            p.step = None
    if p.kind == "int":
        for label, v in (("low", p.low), ("high", p.high), ("step", p.step)):
            if v is not None and not isinstance(v, int):
                raise _err(name, f"{label}={v!r} must be an integer for an int parameter")
        if p.step == 1 and p.log:
            p.step = None
    return p


def _check_choices(name: str, choices: Sequence[Any]) -> List[Any]:
    choices = list(choices)
    if not choices:
        raise _err(name, "choice() needs at least one value")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise _err(name, f"choice values must be scalars (str/int/float/bool/null), got {c!r}")
    seen: List[Any] = []
    for c in choices:
        if any(c == s and type(c) is type(s) for s in seen):
            raise _err(name, f"duplicate choice {c!r}")
        seen.append(c)
    return choices


def strip_key(key: str) -> str:
    return key.lstrip("+~")


def param_from_override(override: Any) -> Optional[Param]:
    """A parsed hydra Override -> Param, or None if it is not a sweep (a fixed value)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    if not override.is_sweep_override():
        return None
    key = override.get_key_element()
    name = strip_key(key)
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    unknown = tags - {"log"}
    if unknown:
        raise _err(name, f"unknown tag(s) {sorted(unknown)}; the only tag understood is 'log'")
    log = "log" in tags
    if isinstance(value, ChoiceSweep):
        if log:
            raise _err(name, "'log' makes no sense for choice()")
        if value.shuffle:
            raise _err(name, "shuffle() is not supported")
        strings = list(override.sweep_string_iterator())
        choices = _check_choices(name, value.list)
        return Param(
            name=name, key=key, kind="categorical", choices=choices,
            choice_strings=dict(zip(choices, strings)),
        )
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise _err(name, "shuffle() is not supported")
        start, stop, step = value.start, value.stop, value.step
        is_int = all(isinstance(v, int) for v in (start, stop, step))
        p = Param(name=name, key=key, kind="int" if is_int else "float", low=start, high=stop,
                  step=step, log=log)
        if not is_int and log:
            # float log range: optuna has no stepped log floats
            raise _err(name, "a log scale cannot have a step; use tag(log, interval(low, high))")
        return _check_numeric(p)
    if isinstance(value, IntervalSweep):
        return _check_numeric(
            Param(name=name, key=key, kind="float", low=value.start, high=value.end, log=log)
        )
    raise _err(name, f"unsupported sweep {value!r}")


def param_from_dict(key: str, spec: Mapping[str, Any]) -> Param:
    name = strip_key(key)
    spec = dict(spec)
    allowed = {"type", "low", "high", "step", "log", "choices"}
    extra = set(spec) - allowed
    if extra:
        raise _err(name, f"unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    typ = spec.get("type")
    if typ is None:
        typ = "categorical" if "choices" in spec else None
    if typ in ("categorical", "choice"):
        if set(spec) - {"type", "choices"}:
            raise _err(name, "a categorical takes only 'choices'")
        choices = _check_choices(name, list(spec.get("choices") or []))
        return Param(name=name, key=key, kind="categorical", choices=choices)
    if typ not in ("float", "int"):
        raise _err(name, f"type must be float, int or categorical (got {typ!r})")
    for req in ("low", "high"):
        if req not in spec:
            raise _err(name, f"missing '{req}'")
    log = bool(spec.get("log", False))
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if typ == "float":
        low = float(low) if _is_num(low) else low
        high = float(high) if _is_num(high) else high
        step = float(step) if _is_num(step) else step
    return _check_numeric(Param(name=name, key=key, kind=typ, low=low, high=high, step=step, log=log))


def build_search_space(
    params: Optional[Mapping[str, Any]], arguments: Sequence[str], config_loader: Any = None
) -> "tuple[List[Param], List[str]]":
    """params (from config) + command-line arguments -> (search params, fixed override strings).

    Command-line entries win over ``params`` entries with the same key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    entries: Dict[str, Any] = {}  # name -> Param | fixed override string
    for key, spec in (params or {}).items():
        key = str(key)
        name = strip_key(key)
        if isinstance(spec, Mapping):
            entries[name] = param_from_dict(key, spec)
        elif isinstance(spec, (list, tuple)):
            entries[name] = Param(name=name, key=key, kind="categorical",
                                  choices=_check_choices(name, spec))
        else:
            s = format_value(spec) if not isinstance(spec, str) else spec
            try:
                ov = parser.parse_override(f"{key}={s}")
            except Exception as e:  # grammar errors
                raise _err(name, f"cannot parse {s!r}: {e}") from e
            p = param_from_override(ov)
            entries[name] = p if p is not None else f"{key}={ov.get_value_element_as_str()}"
    for arg in arguments:
        try:
            ov = parser.parse_override(arg)
        except Exception as e:
            raise SearchSpaceError(f"llmlab_optuna: cannot parse override {arg!r}: {e}") from e
        name = strip_key(ov.get_key_element())
        p = param_from_override(ov)
        if p is not None:
            entries[name] = p
        elif ov.is_delete():
            entries[name] = arg
        else:
            entries[name] = f"{ov.get_key_element()}={ov.get_value_element_as_str()}"
    search = [v for v in entries.values() if isinstance(v, Param)]
    fixed = [v for v in entries.values() if isinstance(v, str)]
    return search, fixed
