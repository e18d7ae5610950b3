"""Checkpoints that survive `kill -9` at any moment, and a resume that trusts only whole ones.

Kinds: a Lightning checkpoint is one file (auto/ddp/cpu_bf16; FSDP with state_dict_type=full) or a
directory (DeepSpeed: `latest` + one subdirectory of per-rank shards; FSDP sharded: a
torch.distributed.checkpoint directory with `.metadata`).

Saving (`save_checkpoint_atomic`, used by llmlab.callbacks.checkpoint.AtomicCheckpoint and StopAtStep):
every rank writes into `<name>.partial`; rank 0 then writes `llmlab_manifest.json` into a directory
checkpoint (every file with its size; written last, so its presence means "whole") and rotates:
`<name>.prev` is deleted, `<name>` becomes `<name>.prev`, `<name>.partial` becomes `<name>`. At every
moment one whole checkpoint exists among `<name>`, `<name>.partial` (with manifest) and `<name>.prev`:

    kill while writing .partial      -> <name> (and .prev) whole; the torn .partial is ignored, then deleted
    kill after .partial is whole     -> .partial is the newest whole one: resume takes it, the next save
                                        renames it into place first (nothing is lost)
    kill between the two renames     -> .prev and .partial whole, <name> absent: resume takes .partial

Resuming (`find_resume_checkpoint`): candidates `<name>`, `<name>.partial`, `<name>.prev` and Slurm's
`hpc_ckpt_N.ckpt`; the newest intact one wins; each torn or corrupt one is named in one log line.
Intact is checked cheaply: a file must be a complete zip archive (its central directory is written
last, so a truncated file fails) whose pickled structure passes its CRC; a directory must match its
manifest and hold complete zip archives. Bit flips inside tensor data are not detected (that would
need reading every byte, or a hash of every byte at save time).

Fault injection for tests (a real delay inside a real save, not a mock): with
`LLMLAB_TEST_PAUSE_IN_SAVE=<file>` and `LLMLAB_TEST_PAUSE_PHASE=writing|written|swapping`, rank 0
writes `<file>` when a save reaches that phase and sleeps `LLMLAB_TEST_PAUSE_SECONDS` (default 60), so
a test can SIGKILL the run there: `writing` = before this rank's part is written (other ranks may
have written theirs), `written` = every rank's part on disk, no manifest, nothing renamed,
`swapping` = the old checkpoint moved to `.prev`, the new one not yet renamed into place.

Resume config check (`check_resume`): each checkpoint records the run config it was made under
(`checkpoint["llmlab_resume"]`, read with an mmap load: no tensor bytes are read). Resuming under a
different model, data, peft, stage, batch size, accumulation or world size is a ConfigError listing
every `key: old -> new`, raised before any weights load; `resume_allow=[data.batch_size,...]` accepts
the changes that can be accepted (model, peft and stage never: the weights would not fit; world size
never under DeepSpeed: its optimizer shards are per rank).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

from llmlab.atomic import atomic_write_text, fsync_dir, remove, sibling
from llmlab.errors import ConfigError

log = logging.getLogger("llmlab")

MANIFEST = "llmlab_manifest.json"
RESUME_KEY = "llmlab_resume"  # checkpoint dict key holding the run config snapshot
PARTIAL, PREV = ".partial", ".prev"


class CheckpointError(ConfigError):
    """A checkpoint named by the user that is missing, torn or corrupt (one line, exit 2)."""


# --------------------------------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: Any) -> bool:
    """A DeepSpeed checkpoint as Lightning writes it: a directory (`last.ckpt/`) with a `latest` tag file
    and one subdirectory per tag holding the per-rank model/optimizer shards."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def is_fsdp_checkpoint(path: Any) -> bool:
    """Lightning's sharded FSDP checkpoint: a torch.distributed.checkpoint directory (`.metadata` +
    `*.distcp` shards, and Lightning's `meta.pt` for the non-tensor state)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def is_checkpoint(path: Any) -> bool:
    """A Lightning checkpoint: a file (ddp/auto/cpu_bf16/fsdp full) or a DeepSpeed / sharded FSDP directory."""
    return Path(path).is_file() or is_deepspeed_checkpoint(path) or is_fsdp_checkpoint(path)


def checkpoint_mtime(path: Any) -> float:
    """When a checkpoint was last written: a file's mtime; for a directory its newest file's
    (DeepSpeed rewrites files inside an existing directory, which leaves the directory's own mtime)."""
    path = Path(path)
    if path.is_dir():
        return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def check_checkpoint_for_strategy(path: Any, strategy_cfg: Any) -> None:
    """Resuming needs the checkpoint kind the strategy reads: DeepSpeed restores its own sharded
    directories (the same ZeRO stage and number of processes: its optimizer shards are per rank),
    sharded FSDP its torch.distributed.checkpoint directories, the other strategies single files."""
    from llmlab.strategies import StrategyConfigError, _is_deepspeed, _strategy_name, is_zero3

    name = _strategy_name(strategy_cfg)
    if is_deepspeed_checkpoint(path) and not _is_deepspeed(strategy_cfg):
        raise StrategyConfigError(
            f"{path} is a DeepSpeed checkpoint directory, which strategy={name} cannot resume; resume with "
            "the strategy (zero1/zero2/zero3) and trainer.devices it was written with, or convert it to one "
            "file first: python -c \"from lightning.pytorch.utilities.deepspeed import "
            f"convert_zero_checkpoint_to_fp32_state_dict as c; c('{path}', 'full.ckpt')\" (weights only)."
        )
    if is_fsdp_checkpoint(path) and name != "fsdp":
        raise StrategyConfigError(
            f"{path} is a sharded FSDP checkpoint directory, which strategy={name} cannot resume; resume with "
            "strategy=fsdp, or convert it to one file first: python -m lightning.pytorch.utilities."
            f"consolidate_checkpoint {path} (then ckpt_path=<that file>)."
        )
    full_weights = bool(getattr(strategy_cfg, "get", lambda *_: False)("load_full_weights", False))
    if Path(path).is_file() and _is_deepspeed(strategy_cfg) and not (full_weights and is_zero3(strategy_cfg)):
        raise StrategyConfigError(
            f"{path} is a single-file checkpoint; strategy={name} (DeepSpeed) resumes from the sharded "
            "checkpoint directories it writes. Resume with the strategy it was written with (e.g. "
            "strategy=ddp), or with strategy=zero3 set strategy.load_full_weights=true to load it (ZeRO-3 only)."
        )


# --------------------------------------------------------------------------------------------------
# Intact or not
# --------------------------------------------------------------------------------------------------


def _zip_problem(path: Path) -> str | None:
    """Why `path` is not a complete torch.save archive, or None. Reads the central directory (at the
    end: a truncated file has none) and CRC-checks the small pickle record; tensor bytes are not read."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            end = max((i.header_offset + i.compress_size for i in infos), default=0)
            if end > size:
                return f"{path.name} is truncated ({size} bytes, its index needs {end})"
            pickle = next((i for i in infos if i.filename.endswith("data.pkl")), None)
            if pickle is None:
                return f"{path.name} has no data.pkl record"
            zf.read(pickle)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{path.name} is not a complete checkpoint archive: {err}"
    return None


def _dir_problem(path: Path) -> str | None:
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as err:
            return f"unreadable {MANIFEST}: {err}"
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} has {f.stat().st_size} bytes, {MANIFEST} says {size}"
            if f.suffix == ".pt" and (problem := _zip_problem(f)):
                return problem
        return None
    if path.name.endswith(PARTIAL):
        return f"no {MANIFEST}: the save did not finish"
    # written without a manifest (before llmlab wrote them, or Lightning's own Slurm hpc_ckpt save)
    if is_fsdp_checkpoint(path):
        return None
    tag_file = path / "latest"
    if not tag_file.is_file():
        return "no 'latest' tag file"
    shards = sorted((path / tag_file.read_text().strip()).glob("*.pt"))
    if not any(s.name.endswith("model_states.pt") for s in shards):
        return "no model_states.pt shard"
    return next((p for s in shards if (p := _zip_problem(s))), None)


def checkpoint_problem(path: Any) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (missing, torn, corrupt), or None when intact."""
    path = Path(path)
    if path.is_dir():
        return _dir_problem(path)
    if path.is_file():
        return _zip_problem(path)
    return "it does not exist"


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _pause_for_test(phase: str) -> None:
    """Fault injection for tests (see the module docstring): a real pause at a named point of a save."""
    marker = os.environ.get("LLMLAB_TEST_PAUSE_IN_SAVE")
    if marker and os.environ.get("LLMLAB_TEST_PAUSE_PHASE", "written") == phase:
        atomic_write_text(marker, phase)
        time.sleep(float(os.environ.get("LLMLAB_TEST_PAUSE_SECONDS", "60")))


def write_manifest(path: Path, global_step: int) -> None:
    """List every file of a whole directory checkpoint with its size; written last, atomically."""
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    atomic_write_text(path / MANIFEST, json.dumps({"global_step": global_step, "files": files}, indent=1))


def _rotate(path: Path) -> None:
    """Rank 0, once `<path>.partial` is whole: `.prev` deleted, `<path>` -> `.prev`, `.partial` -> `<path>`."""
    partial, prev = sibling(path, PARTIAL), sibling(path, PREV)
    remove(prev)
    if path.exists() or path.is_symlink():
        os.rename(path, prev)
    _pause_for_test("swapping")
    os.rename(partial, path)
    fsync_dir(path.parent)


def finish_interrupted_save(path: Any) -> None:
    """Rank 0, before a new save to `path`: a whole `.partial` is a save a kill stopped before its
    rename (maybe the one this run resumed from): rename it into place; a torn one is deleted."""
    partial = sibling(path, PARTIAL)
    if not (partial.exists() or partial.is_symlink()):
        return
    if checkpoint_problem(partial) is None:
        log.info("checkpoint %s is whole: renaming it to %s (a save interrupted before its rename)", partial, path)
        _rotate(Path(path))
    else:
        remove(partial)


def save_checkpoint_atomic(trainer, filepath: Any, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint(filepath)` that never leaves a torn checkpoint under `filepath` and
    keeps the previous one as `<filepath>.prev`. Collective: every rank calls it (each writes its shards)."""
    path = Path(filepath)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        finish_interrupted_save(path)
    trainer.strategy.barrier("llmlab_checkpoint_prepare")
    _pause_for_test("writing")
    partial = sibling(path, PARTIAL)
    trainer.save_checkpoint(partial, weights_only)  # every rank; ends with a barrier
    if trainer.is_global_zero:
        _pause_for_test("written")
        if partial.is_dir():
            write_manifest(partial, trainer.global_step)
        _rotate(path)
    trainer.strategy.barrier("llmlab_checkpoint_done")


def remove_checkpoint(path: Any) -> None:
    """Delete a checkpoint with its `.prev` and any `.partial` (rank 0)."""
    for p in (Path(path), sibling(path, PREV), sibling(path, PARTIAL)):
        remove(p)


# --------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# --------------------------------------------------------------------------------------------------


def resume_candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint a run dir may hold: last.ckpt with its .partial and .prev, Slurm's hpc_ckpt_N.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    paths = [last, sibling(last, PARTIAL), sibling(last, PREV), *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))]
    return [p for p in paths if p.exists()]


def find_resume_checkpoint(run_dir: Any) -> Path | None:
    """The newest intact checkpoint of a run dir (None: start fresh). Each torn or corrupt one newer
    than it is named in one log line; a torn `.partial` older than it is a routine leftover."""
    found = resume_candidates(Path(run_dir))
    intact = [p for p in found if checkpoint_problem(p) is None]
    chosen = max(intact, key=checkpoint_mtime) if intact else None
    for p in found:
        if p not in intact:
            log.warning("checkpoint %s is incomplete or corrupt (%s); resuming from %s", p, checkpoint_problem(p),
                        chosen or "scratch (no intact checkpoint left)")
    if chosen is not None and chosen.name.endswith(PARTIAL):
        log.info("resuming from %s: a whole checkpoint whose save was interrupted just before its rename", chosen)
    return chosen


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


# --------------------------------------------------------------------------------------------------
# Resume config check
# --------------------------------------------------------------------------------------------------

# compared on resume: everything under these groups, and these keys
RESUME_GROUPS = ("model", "data", "peft")
RESUME_KEYS = ("stage.name", "trainer.accumulate_grad_batches")
# never compared: they do not change what the checkpoint's state means
IGNORED = ("data.sample_prompts", "data.val_batch_size", "data.n_val", "data.num_workers")
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
    from omegaconf import OmegaConf

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
    import torch

    path = Path(path)
    f = _checkpoint_dict_file(path)
    if f is not None:
        if is_deepspeed_checkpoint(path):
            check_deepspeed_pickles(path)  # its shards pickle DeepSpeed's own plain data classes
        with torch.serialization.safe_globals(_deepspeed_safe_globals() if is_deepspeed_checkpoint(path) else []):
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(state, dict) and RESUME_KEY in state:
            return dict(state[RESUME_KEY])
    for run_dir in (path.parent.parent, path.parent):
        if (run_dir / "config_resolved.yaml").is_file() and (run_dir / "checkpoints").is_dir():
            from omegaconf import OmegaConf

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
    from llmlab.strategies import _is_deepspeed

    never = [k for k in diffs if _matches(k, NEVER_ALLOWED) or (k == "world_size" and _is_deepspeed(cfg.strategy))]
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


# --------------------------------------------------------------------------------------------------
# Reading the weights (llmlab.export)
# --------------------------------------------------------------------------------------------------


def load_weights(path: Any) -> dict:
    """The LightningModule state dict (`model.` keys) of any checkpoint kind, full tensors on CPU:
    a file (`state_dict`; also FSDP with state_dict_type=full), a DeepSpeed directory (shards gathered
    to fp32), a sharded FSDP directory (torch.distributed.checkpoint, read without a process group)."""
    import torch

    path = Path(path)
    if is_deepspeed_checkpoint(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_deepspeed_pickles(path)  # DeepSpeed unpickles its shards with weights_only=False
        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    if is_fsdp_checkpoint(path):
        # Lightning's FSDPStrategy.save_checkpoint stores the module state under "model"
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["model"]
    try:  # tensors and plain containers only: a crafted checkpoint cannot run code
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, OSError) as err:
        raise ConfigError(f"{path}: not a Lightning checkpoint llmlab can read safely (weights_only=True; "
                          f"{type(err).__name__}); pass checkpoints/last.ckpt of a run") from None


# --------------------------------------------------------------------------------------------------
# Unpickling safely
# --------------------------------------------------------------------------------------------------

# the only non-tensor classes DeepSpeed pickles into its shards (optimizer states); plain data
DEEPSPEED_GLOBALS = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address"}


def check_deepspeed_pickles(ckpt_dir: Path) -> None:
    """DeepSpeed's zero_to_fp32 loads shards with weights_only=False: first list each shard's pickled
    globals without unpickling it (torch.serialization.get_unsafe_globals_in_checkpoint) and refuse
    any beyond DeepSpeed's own data classes (e.g. os.system in a crafted file)."""
    import torch

    for f in sorted(Path(ckpt_dir).rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as err:  # noqa: BLE001 - not a torch file at all
            raise ConfigError(f"{ckpt_dir}: {f.name} is not a readable DeepSpeed shard "
                              f"({type(err).__name__})") from None
        if unsafe - DEEPSPEED_GLOBALS:
            raise ConfigError(f"{ckpt_dir}: {f.name} pickles {sorted(unsafe - DEEPSPEED_GLOBALS)[0]}, which a "
                              f"DeepSpeed checkpoint never holds; refusing to unpickle it")


def _deepspeed_safe_globals() -> list:
    """DEEPSPEED_GLOBALS as objects, for torch.serialization.safe_globals (weights_only loads)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]
