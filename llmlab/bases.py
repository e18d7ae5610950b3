"""Tiny base checkpoints that later stages start from, built on first use and cached.

`stage=sft` starts from a pretrained tiny model, `stage=rm|dpo|ppo` from an SFT'd one. Rather than
shipping weights, llmlab builds them with its own recipes (`python -m llmlab.run <overrides>`), once,
into `$LLMLAB_CACHE/bases/<name>-<hash>/hf` (default cache: ~/.cache/llmlab). The hash covers the
recipe overrides and the source of the package's data/model code, so a change rebuilds.
Config files refer to them through the resolver `${llmlab_base:<name>}` (registered in llmlab.run).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("llmlab")

# name -> the recipe (overrides of `python -m llmlab.run`) that builds it
BASES: dict[str, list[str]] = {
    "tiny-pretrained": ["stage=pretrain", "model=tiny", "seed=0"],
    "tiny-sft": ["stage=sft", "model=tiny_base", "seed=0"],
    # the SFT recipe stopped early: a real SFT policy that is still imperfect, so PPO has headroom
    "tiny-sft-early": ["stage=sft", "model=tiny_base", "seed=0", "trainer.max_steps=400"],
}
_PRETRAIN_SOURCES = ("data/builtin.py", "data/tokenizer.py", "data/formats.py", "data/templates.py",
                     "stages/pretrain.py")
_SFT_SOURCES = (*_PRETRAIN_SOURCES, "stages/sft.py", "metrics.py", "../conf/stage/sft.yaml")
# per base: the sources its recipe runs (editing the SFT stage must not rebuild the pretrained base)
_HASHED_SOURCES: dict[str, tuple[str, ...]] = {
    "tiny-pretrained": _PRETRAIN_SOURCES,
    "tiny-sft": _SFT_SOURCES,
    "tiny-sft-early": _SFT_SOURCES,
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE", Path.home() / ".cache" / "llmlab"))


def _fingerprint(name: str) -> str:
    h = hashlib.sha256(" ".join(BASES[name]).encode())
    root = Path(__file__).parent
    for rel in _HASHED_SOURCES.get(name, _PRETRAIN_SOURCES):
        p = root / rel
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:10]


def base_path(name: str) -> Path:
    if name not in BASES:
        raise ValueError(f"unknown llmlab base {name!r}; known: {sorted(BASES)}")
    return cache_dir() / "bases" / f"{name}-{_fingerprint(name)}" / "hf"


def ensure_base(name: str) -> str:
    """Path of the base's HF directory, building it first if needed (one process builds; others wait)."""
    path = base_path(name)
    if (path / "config.json").exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            _build(name, path)
    return str(path)


def _build(name: str, path: Path) -> None:
    run_dir = path.parent / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "llmlab.run", *BASES[name], f"hydra.run.dir={run_dir}",
           "logger=csv", "trainer.enable_progress_bar=false"]
    print(f"llmlab: building base '{name}' once (cached at {path.parent}) ...", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0 or not (run_dir / "hf" / "config.json").exists():
        tail = "\n".join(result.stderr.splitlines()[-15:])
        raise RuntimeError(f"building base '{name}' failed ({' '.join(cmd)}):\n{tail}")
    shutil.copytree(run_dir / "hf", path.with_name("hf.tmp"), dirs_exist_ok=True)
    os.replace(path.with_name("hf.tmp"), path)  # atomic: a half-built base is never visible
