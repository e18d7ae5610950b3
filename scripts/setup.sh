#!/usr/bin/env bash
# Create .venv and install llmlab with every extra (DeepSpeed, bitsandbytes, Slurm launcher, Optuna)
# and the test tools, at the versions the suite last passed with (scripts/constraints.txt, written by
# scripts/lock.sh; LLMLAB_UNLOCKED=1 takes the newest versions pyproject.toml's ranges allow instead).
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "${LLMLAB_UNLOCKED:-0}" = 1 ]; then LOCK=(); else LOCK=(-c scripts/constraints.txt); fi
# torch first, pinned: a bare requirement can pull a multi-GB CUDA build onto CPU-only machines.
# (On a GPU machine with internet this same pin installs the CUDA build, which is what you want.)
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" "${LOCK[@]}" -e ".[all,dev]"
echo "llmlab: environment ready in .venv"
