"""Resuming under the config a checkpoint was made under, or refusing before any weights load.

Each checkpoint records the run config it was made under (`checkpoint["llmlab_resume"]`, written by
callbacks/checkpoint.py, read with an mmap load: no tensor bytes are read). Resuming under a
different model, data, peft, stage, batch size, accumulation or world size is a ConfigError listing
every `key: old -> new`, raised before any weights load; `resume_allow=[data.batch_size,...]` accepts
the changes that can be accepted (model, peft and stage never: the weights would not fit; world size
never under DeepSpeed: its optimizer shards are per rank). Finding and validating the checkpoint
itself is llmlab/checkpointing/checkpoints.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from llmlab.checkpointing.checkpoints import (
    CheckpointError,
    check_deepspeed_pickles,
    checkpoint_problem,
    deepspeed_safe_globals,
    find_resume_checkpoint,
    is_checkpoint,
    is_deepspeed_checkpoint,
)
from llmlab.checks.strategy import check_checkpoint_for_strategy
from llmlab.distributed.detect import is_deepspeed
from llmlab.errors import ConfigError

log = logging.getLogger("llmlab")

RESUME_KEY = "llmlab_resume"  # checkpoint dict key holding the run config snapshot

# compared on resume: everything under these groups, and these keys
RESUME_GROUPS = ("model", "data", "peft")
RESUME_KEYS = ("stage.name", "trainer.accumulate_grad_batches")
# never compared: they do not change what the checkpoint's state means
IGNORED = ("data.sample_prompts", "data.val_batch_size", "data.n_val", "data.num_workers", "data.num_proc",
           "data.cache_dir")
# never accepted, even with resume_allow: the checkpoint's weights would not fit, or mean something else
NEVER_ALLOWED = ("model", "peft", "stage.name")
_UNSET = "<unset>"


def _flatten(prefix: str, node: Any, out: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = node


def _matches(key: str, prefixes: Any) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def world_size_of(cfg) -> int | str:
    """Processes a config asks for: trainer.devices x trainer.num_nodes (a string when devices is 'auto')."""
    devices, nodes = cfg.trainer.get("devices", 1), int(cfg.trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices) * nodes
    if hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices) * nodes
    return f"{devices}x{nodes}"


def run_snapshot(cfg, world_size: int | str | None = None) -> dict:
    """The flat `key: value` config a checkpoint's state depends on (what `check_resume` compares)."""
    out: dict = {}
    for group in RESUME_GROUPS:
        node = cfg.get(group)
        _flatten(group, OmegaConf.to_container(node, resolve=True) if node is not None else None, out)
    for key in RESUME_KEYS:
        out[key] = OmegaConf.select(cfg, key)
    out["world_size"] = world_size if world_size is not None else world_size_of(cfg)
    return {k: v for k, v in out.items() if not _matches(k, IGNORED)}


def _checkpoint_dict_file(path: Path) -> Path | None:
    """The file holding a checkpoint's non-tensor state (for DeepSpeed: rank 0's model states)."""
    if path.is_file():
        return path
    tag_file = path / "latest"
    if tag_file.is_file():
        f = path / tag_file.read_text().strip() / "mp_rank_00_model_states.pt"
        return f if f.is_file() else None
    return path / "meta.pt" if (path / "meta.pt").is_file() else None  # sharded FSDP


def stored_snapshot(path: Any) -> dict | None:
    """The run config a checkpoint was written under: recorded in the checkpoint (mmap load: tensor
    bytes are not read), else the `config_resolved.yaml` of the run dir it lies in, else None."""
    path = Path(path)
    f = _checkpoint_dict_file(path)
    if f is not None:
        deepspeed = is_deepspeed_checkpoint(path)
        if deepspeed:
            check_deepspeed_pickles(path)  # its shards pickle DeepSpeed's own plain data classes
        with torch.serialization.safe_globals(deepspeed_safe_globals() if deepspeed else []):
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(state, dict) and RESUME_KEY in state:
            return dict(state[RESUME_KEY])
    for run_dir in (path.parent.parent, path.parent):
        if (run_dir / "config_resolved.yaml").is_file() and (run_dir / "checkpoints").is_dir():
            return run_snapshot(OmegaConf.load(run_dir / "config_resolved.yaml"))
    return None


def check_resume(cfg, ckpt_path: Any) -> None:
    """Refuse, before any weights load, to resume `ckpt_path` under a different run config; the error
    lists every `key: old -> new`. `resume_allow=[keys or groups]` accepts the acceptable ones."""
    old = stored_snapshot(ckpt_path)
    if old is None:
        log.warning("resume: %s records no run config; resuming without checking it", ckpt_path)
        return
    new = run_snapshot(cfg)
    diffs = {k: (old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(set(old) | set(new))
             if old.get(k, _UNSET) != new.get(k, _UNSET)}
    if not isinstance(diffs.get("world_size", (0, 0))[1], int):  # devices=auto: Lightning decides
        diffs.pop("world_size", None)
    if not diffs:
        return
    never = [k for k in diffs if _matches(k, NEVER_ALLOWED) or (k == "world_size" and is_deepspeed(cfg.strategy))]
    allow = list(cfg.get("resume_allow") or [])
    blocked = [k for k in diffs if k in never or not _matches(k, allow)]
    changes = "; ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in diffs)
    if not blocked:
        log.warning("resume: %s was written under a different config, accepted by resume_allow: %s", ckpt_path, changes)
        return
    fixes = []
    if never:
        fixes.append(f"{', '.join(never)} cannot change on resume (the saved weights/optimizer shards would not "
                     "fit): restore the old values or start a new run dir (hydra.run.dir=...)")
    if [k for k in blocked if k not in never]:
        acceptable = ",".join(k for k in diffs if k not in never)
        fixes.append(f"accept the{' other' if never else ''} changes with resume_allow=[{acceptable}]")
    raise ConfigError(f"resume from {ckpt_path}: the run config differs from the one it was written under: "
                      f"{changes}. {'; '.join(fixes)}.")


def resolve_ckpt_path(cfg) -> str | None:
    """The checkpoint this run resumes from: `ckpt_path=<path>` (must be intact) or `resume=auto`
    (the newest intact one in the run dir); the strategy must be able to read its kind."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not is_checkpoint(path):
            raise CheckpointError(f"ckpt_path={path}: no such checkpoint file (or DeepSpeed/FSDP checkpoint directory)")
        if problem := checkpoint_problem(path):
            raise CheckpointError(f"ckpt_path={path}: the checkpoint is incomplete or corrupt ({problem}); "
                                  f"pass an intact one or resume=auto (which falls back to the previous)")
        check_checkpoint_for_strategy(path, cfg.strategy)
        return str(path)
    if cfg.resume == "auto":
        path = find_resume_checkpoint(Path(cfg.paths.output_dir))
        if path is None:
            return None
        check_checkpoint_for_strategy(path, cfg.strategy)
        return str(path)
    if cfg.resume not in (None, "none"):
        raise ConfigError(f"resume={cfg.resume!r}: use resume=auto, or ckpt_path=<file>")
    return None
