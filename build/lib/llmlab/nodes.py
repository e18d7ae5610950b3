"""Config nodes as plain Python: the one conversion from OmegaConf containers (what Hydra passes) to dicts
and lists. Imports omegaconf only when it is already loaded: a plain dict or list needs no conversion."""
from __future__ import annotations

import sys
from typing import Any


def to_plain(obj: Any, resolve: bool = True) -> Any:
    """OmegaConf containers to plain dicts/lists (interpolations resolved unless `resolve=False`);
    anything else unchanged."""
    if "omegaconf" in sys.modules:
        # lazy: only when already loaded (module docstring)
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=resolve)
    return obj
