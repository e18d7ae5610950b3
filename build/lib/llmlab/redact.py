"""Keep credentials off disk and out of logs: `***` for secret-looking keys and URL passwords.

A key is secret when its last part contains token / password / passwd / secret / api_key / apikey /
credential (e.g. `+wandb_api_key=...`, `hparams_search.storage_password`); a value is redacted wherever
it carries `user:pass@` in a URL (an Optuna storage such as postgresql://me:pw@host/db). Used where
llmlab writes what the user typed: config_resolved.yaml, optimization_results.yaml and the Optuna
sweeper's logs, llmlab.report's outputs, the Slurm launcher's sbatch echo, the pipeline's logs, and
every `llmlab: error:` line.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

MASK = "***"
# "token" as a credential, not a count or id (max_new_tokens, tokenizer, pad_token_id stay readable)
_SECRET = r"(?:token(?!s|iz|_id|_type)|passw(?:or)?d|secret|api[_-]?key|apikey|credential|private[_-]?key)"
SECRET_KEY = re.compile(_SECRET, re.I)
# scheme://user:password@host -> scheme://user:***@host
URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]+):([^\s@/'\"]+)@")
# key=value / key: value / "key": "value" where the key looks secret (overrides, logs, yaml lines)
KEY_VALUE = re.compile(r"(?P<key>[\w.+~\-]*" + _SECRET + r"[\w\-]*)"
                       r"""(?P<sep>["']?\s*[=:]\s*["']?)(?P<value>[^\s,'"\]}]+)""", re.I)


def is_secret_key(key: str) -> bool:
    """True for a dotted key whose last part names a credential."""
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact_text(text: str) -> str:
    """A string with URL passwords and `secret_key=value` values replaced by ***."""
    text = URL_PASSWORD.sub(rf"\1:{MASK}@", str(text))
    return KEY_VALUE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{MASK}", text)


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a plain container (dict/list/str) with secrets masked: values under secret keys
    become ***, strings are passed through `redact_text`."""
    if key and is_secret_key(key) and isinstance(obj, str):  # flags and counts are no credentials
        return MASK
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redacted_yaml(cfg, resolve: bool = True) -> str:
    """An OmegaConf config as YAML with its secrets masked (what config_resolved.yaml holds)."""
    # lazy (OmegaConf, Hydra here and below): llmlab.errors imports this module, and llmlab.report,
    # .generate and .export import that one and answer --help without either
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=resolve)
    return OmegaConf.to_yaml(OmegaConf.create(redact(plain)))


def redact_file(path) -> None:
    """Mask secrets in a text file in place (Hydra's .hydra/*.yaml, multirun.yaml); untouched if clean."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return
    clean = redact_text(text)
    if clean != text:
        path.write_text(clean)


def redact_hydra_outputs() -> None:
    """Mask secrets in what Hydra wrote for this job before calling it: <run dir>/.hydra/{config,hydra,
    overrides}.yaml and, in a sweep, <sweep dir>/multirun.yaml (they hold the command line verbatim)."""
    from hydra.core.hydra_config import HydraConfig  # lazy: see redacted_yaml

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.output_subdir is not None:
        for f in sorted((Path(hc.runtime.output_dir) / str(hc.output_subdir)).glob("*.yaml")):
            redact_file(f)
    if hc.sweep.dir:
        redact_file(Path(str(hc.sweep.dir)) / "multirun.yaml")


def redact_logs() -> None:
    """Mask secrets in every log record of this process (Hydra's launcher logs each job's overrides,
    e.g. `#0 : +wandb_api_key=...`). A record factory survives Hydra's logging.config.dictConfig, which
    replaces handlers and filters."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_llmlab_redact", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's business, not ours
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    factory._llmlab_redact = True
    logging.setLogRecordFactory(factory)
