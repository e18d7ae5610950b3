"""Errors for bad input: one readable message that names the setting and the fix.

Every entry point (llmlab.run, .pipeline, .generate, .export, .report) reports a user mistake the same
way: exit code 2 and ONE stderr line `llmlab: error: <setting>=<value>: <what is wrong>; <the fix>`,
never a traceback. `fail()` prints it; `guard_hydra()` does the same for Hydra's own composition errors
(unknown key, unknown group option), adding a "did you mean" from the composed config's keys.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from llmlab.redact import redact_text


class ConfigError(ValueError):
    """An impossible or wrong setting, found before any weights load."""


class DataError(ValueError):
    """Bad data settings or contents; the message names the setting and the fix."""


class StrategyConfigError(ConfigError):
    """A strategy choice that cannot work with the other settings; the message names the override to change."""


class RunDiverged(RuntimeError):
    """The run stopped after too many non-finite steps in a row (exit code 1: not a user error)."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report  # rank 0 prints the one-line error; other ranks exit quietly


def one_line(message: object) -> str:
    """The message on one line: a traceback-free, grep-able error (newlines -> '; ')."""
    out = ""
    for part in (p.strip() for p in str(message).splitlines()):
        if part:
            out += part if not out else (" " if out.endswith((".", ":", ";")) else "; ") + part
    return out


def fail(message: object, code: int = 2):
    """Print `llmlab: error: ...` (one line) and exit with `code` (2: the user's input)."""
    print(f"llmlab: error: {redact_text(one_line(message))}", file=sys.stderr, flush=True)
    sys.exit(code)


def flat_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of a (nested) config, leaves and inner nodes alike, without resolving values."""
    # lazy (OmegaConf, Hydra here and below): llmlab.report, .generate and .export import this module
    # and answer --help without either
    from omegaconf import DictConfig, OmegaConf

    keys = []
    container = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    for key, value in (container or {}).items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys += flat_keys(value, f"{full}.")
    return keys


def did_you_mean(key: str, keys: list[str]) -> str:
    """' did you mean trainer.max_steps?' for a near miss among `keys` (difflib), else ''."""
    leaf, parent = key.rsplit(".", 1)[-1], key.rsplit(".", 1)[0] if "." in key else ""
    # the same leaf deeper under the same parent first (stage.module.lr -> stage.module.optimizer.lr)
    close = [k for k in keys if parent and k.startswith(parent + ".") and k.rsplit(".", 1)[-1] == leaf]
    close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _bad_key(text: str) -> str | None:
    """The dotted key a Hydra/OmegaConf composition error is about (full_key: ... or override 'x')."""
    for pattern in (r"full_key: ([\w.\-/]+)", r"override '([^'=]+)'", r"Key '([^']+)' is not in struct"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def _composed_keys(config_name: str, argv: list[str]) -> list[str]:
    """Keys of the config composed from the group choices in argv (bad keys left out); [] on failure."""
    # lazy: see flat_keys
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = [a for a in argv if "=" in a and "." not in a.split("=", 1)[0] and not a.startswith(("-", "+", "~"))
              and "," not in a]
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    for overrides in (groups, []):
        try:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=conf, version_base="1.3"):
                return flat_keys(compose(config_name, overrides=overrides))
        except Exception:  # noqa: BLE001 - a suggestion is best effort
            continue
    return []


def hydra_message(err: BaseException, config_name: str, argv: list[str]) -> str:
    """Hydra's own text (and its OmegaConf cause) on one line, plus a "did you mean" for a bad key."""
    text = one_line(str(err).split("Config search path")[0])  # the search path is Hydra's internals
    if getattr(err, "override", None) and err.override not in text:  # OverrideParseException: name it
        text = f"cannot parse the override {err.override!r}: {text}"
    cause = err.__cause__
    if cause is not None and one_line(cause) not in text:
        text = f"{text}; {one_line(cause)}"
    key = _bad_key(str(err) + "\n" + str(cause or ""))
    if key:
        text += did_you_mean(key.lstrip("+~"), _composed_keys(config_name, argv))
    return text


def guard_hydra(config_name: str) -> None:
    """Make Hydra's composition errors (unknown key or group option, bad override syntax) one
    `llmlab: error:` line with exit 2, instead of its multi-line report with exit 1.

    Hydra reports them in hydra._internal.utils.run_and_report; we wrap the function it runs and turn
    its user-input exceptions into `fail()` (SystemExit passes through run_and_report untouched).
    """
    # lazy: see flat_keys
    import hydra._internal.utils as hydra_utils
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import ConfigKeyError

    if getattr(hydra_utils.run_and_report, "_llmlab", False):
        return
    original = hydra_utils.run_and_report
    user_errors = (ConfigCompositionException, MissingConfigException, OverrideParseException, ConfigKeyError)
    try:  # llmlab's sweeper: a search space the user wrote that cannot be searched
        from hydra_plugins.llmlab_optuna._search_space import SearchSpaceError

        user_errors += (SearchSpaceError,)
    except ImportError:
        pass

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except user_errors as err:
                fail(hydra_message(err, config_name, sys.argv[1:]))

        return original(guarded)

    run_and_report._llmlab = True
    hydra_utils.run_and_report = run_and_report


class PipelineError(RuntimeError):
    """The chain cannot go on; `code` is the exit status (2: the user's input, as for llmlab.run)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def is_user_error(err: BaseException) -> bool:
    """ConfigError / DataError / a missing file: the user's input, reported as one line (exit 2)."""
    return isinstance(err, (ConfigError, DataError, FileNotFoundError))
