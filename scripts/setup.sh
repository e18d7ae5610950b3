#!/usr/bin/env bash
# Create .venv and install llmlab with every extra (DeepSpeed, bitsandbytes, Slurm launcher, Optuna)
# and the test tools. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: a bare requirement can pull a multi-GB CUDA build onto CPU-only machines.
# (On a GPU machine with internet this same pin installs the CUDA build, which is what you want.)
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,dev]"
echo "llmlab: environment ready in .venv"
