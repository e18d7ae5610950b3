"""Typed, bounded values: the one reading of a setting as a number, an integer, a fraction or a switch, each
refusal a one-line ConfigError that names the setting and an example; and the rules of the top-level
settings of conf/train.yaml (config alone, no torch import: `check_top_level`, run by `check_settings`).

Top-level settings (`TOP_LEVEL`, the table below; the other groups' numbers live with their group: trainer.py,
data.py, stage.py, model.py):
- `seed`: an integer >= 0; `stop_at_step`: an integer >= 1 or null;
- `dry_run`, `compile`, `release_freed_memory`: switches (true/false; a word there would read as "on");
- `resume`: null or auto; `ckpt_path`: null or an existing checkpoint file / DeepSpeed directory;
  `resume_allow`: a list of keys;
- `paths.output_dir` (the run dir, `hydra.run.dir` by default): a directory that exists or can be created,
  and can be written (`check_output_dir`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from llmlab.errors import ConfigError, PipelineError
from llmlab.nodes import to_plain


def number(value, setting: str, example: str) -> float:
    """A numeric setting as float; ConfigError naming it when it is text or null."""
    if isinstance(value, bool):
        value = None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}={value!r} is not a number; e.g. {setting}={example}") from None


def is_int(value) -> bool:
    """An integer as YAML/Hydra give it (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value, setting: str, example: str, minimum: int | None = None, *, allow=(), null: bool = False,
            what: str = "an integer") -> int | None:
    """An integer setting >= `minimum` (or one of `allow`, or null when `null`); ConfigError naming it."""
    if (value is None and null) or (value in allow and is_int(value)):
        return value
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        extra = "".join(f" or {a}" for a in allow) + (" or null" if null else "")
        raise ConfigError(f"{setting}={value!r}: give {what}{bound}{extra}, e.g. {setting}={example}")
    return value


def switch(value, setting: str, meaning: str = "") -> bool:
    """A true/false setting: a word there (`yes`, a mode name) would be read as "on" by Python's truth test."""
    if not isinstance(value, bool):
        raise ConfigError(f"{setting}={value!r}: give {setting}=true{f' ({meaning})' if meaning else ''} or "
                          f"{setting}=false")
    return value


def count_or_fraction(value, setting: str, example: str, *, null: bool = True) -> None:
    """A batch/step count (integer >= 0) or a fraction in [0, 1] (float), as Lightning's limit_* take."""
    if value is None and null:
        return
    ok = (is_int(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)
    if not ok:
        raise ConfigError(f"{setting}={value!r}: give a number of batches >= 0 or a fraction in [0.0, 1.0]"
                          f"{' or null (all)' if null else ''}, e.g. {setting}={example}")


def in_range(value, setting: str, example: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    """A number within [low, high] (an end excluded when `low_open` / `high_open`)."""
    x = number(value, setting, example)
    if math.isnan(x) or x < low or x > high or (low_open and x == low) or (high_open and x == high):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{setting}={value!r}: give a number in {span}, e.g. {setting}={example}")
    return x


def one_of(value, setting: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{setting}={value!r}: use one of {', '.join(str(c) for c in choices)}")


def override_list(value, setting: str) -> list[str]:
    """A list of `key=value` overrides (a bare string would be split into characters)."""
    from omegaconf import ListConfig

    if value is None:
        return []
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(o, str) and "=" in o for o in value):
        raise PipelineError(f"{setting}={value}: give a list of llmlab.run overrides, e.g. "
                            f"{setting}=\"['trainer.max_steps=10','data.batch_size=8']\"")
    return [str(o) for o in value]


# ---- the top-level settings of conf/train.yaml: (setting, check) in the order they are read

TOP_LEVEL = (
    ("seed", lambda v: integer(v, "seed", "1234", 0)),
    ("stop_at_step", lambda v: integer(v, "stop_at_step", "100", 1, null=True)),
    ("dry_run", lambda v: switch(v, "dry_run", "build the model, report its memory, exit")),
    ("compile", lambda v: switch(v, "compile", "the model's forward through torch.compile, inductor")),
    ("release_freed_memory", lambda v: switch(v, "release_freed_memory", "freed blocks back to the OS at once")),
)


def check_top_level(cfg) -> None:
    """Every top-level setting typed and bounded (TOP_LEVEL), resume settings, the run dir."""
    for key, check in TOP_LEVEL:
        if key in cfg:
            check(cfg.get(key))
    check_resume_settings(cfg)
    check_output_dir(cfg)


def check_resume_settings(cfg) -> None:
    """`resume` is null or auto, `ckpt_path` an existing checkpoint, `resume_allow` a list of keys."""
    from omegaconf import ListConfig

    resume = cfg.get("resume")
    if resume not in (None, "none", "auto"):
        raise ConfigError(f"resume={resume!r}: use resume=auto (continue from the run dir's last checkpoint), "
                          f"or ckpt_path=<file>")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and (not isinstance(ckpt, str) or not ckpt.strip()):
        raise ConfigError(f"ckpt_path={ckpt!r}: give the path of a checkpoint file (or DeepSpeed checkpoint "
                          f"directory), or null")
    if ckpt and not Path(ckpt).expanduser().exists():
        raise ConfigError(f"ckpt_path={ckpt}: no such checkpoint file (or DeepSpeed checkpoint directory)")
    allow = cfg.get("resume_allow")
    if allow is not None and (not isinstance(allow, (list, ListConfig)) or not all(isinstance(k, str) for k in allow)):
        raise ConfigError(f"resume_allow={allow!r}: give a list of config keys or groups, e.g. "
                          f"resume_allow=[data.batch_size,trainer.accumulate_grad_batches]")


def unwritable_reason(path: Path) -> str | None:
    """Why a directory cannot be created (or written) at `path`, without creating anything; None when it can."""
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists():  # the nearest existing ancestor: the one mkdir(parents=True) would write in
        if probe.parent == probe:
            return f"{probe} does not exist"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is {'a file' if probe.is_file() else 'not a directory'}"
    if not os.access(probe, os.W_OK | os.X_OK):  # a read-only mount is refused here even for root (EROFS)
        return f"{probe} is not writable"
    return None


def check_output_dir(cfg) -> None:
    """`paths.output_dir` (the run dir; Hydra's run dir by default) must be a directory this process can create
    and write: else every file a run writes (config, checkpoints, summary.json) fails after the model loads."""
    paths = cfg.get("paths") or {}
    try:
        out = paths.get("output_dir")
    except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra job (a config composed in a test): no run dir
        return
    if out is None:
        return
    reason = unwritable_reason(Path(str(out)))
    if reason:
        raise ConfigError(f"paths.output_dir={out}: cannot create or write the run directory there ({reason}); "
                          f"give a writable directory with hydra.run.dir=<dir> (paths.output_dir follows it by default)")


def check_run_dir_arguments(argv: list[str]) -> None:
    """`hydra.run.dir=` / `hydra.sweep.dir=` given on the command line must be directories this process can
    create: Hydra makes them before any llmlab code runs (and before `check_output_dir`), so an impossible one
    would end in Hydra's traceback."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            reason = unwritable_reason(Path(value))
            if reason:
                raise ConfigError(f"{key}={value}: cannot create the run directory there ({reason}); "
                                  f"give a writable location, e.g. {key}=outputs/my-run")


def config_overrides(model_cfg) -> dict:
    """`model.config_overrides`: config values set over the architecture's own (a pretrained model's config.json,
    or `config:`), e.g. `+model.config_overrides.output_router_logits=true` (conf/model/hf.yaml)."""
    overrides = to_plain(model_cfg.get("config_overrides")) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.config_overrides={overrides!r}: give config keys and values, e.g. "
                          f"+model.config_overrides.output_router_logits=true")
    return overrides
