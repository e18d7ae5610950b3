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

The resume config check (`check_resume`: same model, data, peft, ... as the checkpoint) is in
llmlab/checkpointing/resume.py.
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

from llmlab.checkpointing.atomic import atomic_write_text, fsync_dir, remove, sibling
from llmlab.errors import ConfigError

log = logging.getLogger("llmlab")

MANIFEST = "llmlab_manifest.json"
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


# --------------------------------------------------------------------------------------------------
# Reading the weights (llmlab.export)
# --------------------------------------------------------------------------------------------------


def load_weights(path: Any) -> dict:
    """The LightningModule state dict (`model.` keys) of any checkpoint kind, full tensors on CPU:
    a file (`state_dict`; also FSDP with state_dict_type=full), a DeepSpeed directory (shards gathered
    to fp32), a sharded FSDP directory (torch.distributed.checkpoint, read without a process group)."""
    # lazy (torch, lightning here and below): llmlab.checks imports this module before torch loads
    import torch

    path = Path(path)
    if is_deepspeed_checkpoint(path):
        # lazy (DeepSpeed here and below): a heavy optional library, for DeepSpeed checkpoints only
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

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


def deepspeed_safe_globals() -> list:
    """DEEPSPEED_GLOBALS as objects, for torch.serialization.safe_globals (weights_only loads)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]
