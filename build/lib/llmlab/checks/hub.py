"""The Hugging Face hub seen from a machine that may be offline: is a repo cached, is the hub reachable,
and one-line errors for names that cannot load (typo'd, gated, offline) with the fix."""
from __future__ import annotations

from pathlib import Path

from llmlab.errors import ConfigError


def hub_fixes(name: str, setting: str, alternative: str | None = None) -> str:
    """How to use a hub model on a machine that cannot reach the hub: download it where the hub is
    reachable and pass the local directory as `setting` (or the `alternative`)."""
    text = (f"download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) and pass "
            f"{setting}=<local dir>")
    return f"{text}, or {alternative}" if alternative else text


def hub_cache_dir() -> Path:
    """Where huggingface_hub caches downloads (its own resolution of HF_HUB_CACHE / HF_HOME; a light import)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE).expanduser()


def in_hub_cache(name: str) -> bool:
    """True when a hub repo's files are already downloaded (any snapshot with a config or tokenizer file)."""
    snapshots = hub_cache_dir() / f"models--{name.replace('/', '--')}" / "snapshots"
    wanted = ("config.json", "tokenizer_config.json", "tokenizer.json")
    return snapshots.is_dir() and any((s / f).exists() for s in snapshots.iterdir() for f in wanted)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (HF_ENDPOINT respected), given up after `timeout` seconds
    (DNS included): without network this answers in seconds instead of a minute of download retries."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def check_hub(cfg) -> None:
    """A hub name (not a local dir) must be in the local cache or the hub reachable: else one line now,
    not 60 s of retries then a transformers traceback."""
    import os

    m = cfg.model
    names = []
    if m.get("init") == "pretrained" and m.get("pretrained"):
        names.append(("model.pretrained", str(m.pretrained)))
    # the tokenizer comes from model.tokenizer, else model.pretrained; a shapes-only dry run builds none
    shapes_only = cfg.get("dry_run") and m.get("init") == "scratch" and "vocab_size" in (m.get("config") or {})
    tok = m.get("tokenizer") or m.get("pretrained")
    if tok and tok != "builtin" and not shapes_only and str(tok) not in [n for _, n in names]:
        names.append(("model.tokenizer" if m.get("tokenizer") else "model.pretrained", str(tok)))
    hub = [(k, n) for k, n in names if not Path(n).expanduser().exists() and not n.startswith(("/", ".", "~"))]
    missing = [(k, n) for k, n in hub if not in_hub_cache(n)]
    if not missing:
        return
    setting, name = missing[0]
    weights = setting == "model.pretrained" and m.get("init") == "pretrained"
    fixes = (hub_fixes(name, "model.pretrained", "train from random weights with model.init=scratch") if weights
             else hub_fixes(name, "model.tokenizer", "use the byte-level model.tokenizer=builtin"))
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if offline:
        raise ConfigError(f"{setting}={name}: not in the local Hugging Face cache ({hub_cache_dir()}) and "
                          f"HF_HUB_OFFLINE=1; {fixes}")
    if not hub_reachable():
        raise ConfigError(f"{setting}={name}: the Hugging Face hub ({endpoint}) cannot be reached and the model is "
                          f"not in the local cache ({hub_cache_dir()}); {fixes}")


def hub_error(setting: str, name: str, err: BaseException) -> ConfigError:
    """A transformers/huggingface_hub load failure (typo'd repo, gated repo, missing files) as one line."""
    kind = type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else kind
    not_found = "is not a local folder and is not a valid model" in str(err)
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or not_found:
        return ConfigError(f"{setting}={name}: no such model on the Hugging Face hub (or it is private/gated); "
                           f"check the spelling (e.g. facebook/opt-1.3b), log in with `hf auth login` for gated "
                           f"models, or pass a local directory")
    if kind == "RevisionNotFoundError":
        return ConfigError(f"{setting}={name}: no such revision on the hub; check model.revision")
    return ConfigError(f"{setting}={name}: cannot load it ({kind}: {text}); pass a local directory with "
                       f"config.json and weights, or check the hub name")
