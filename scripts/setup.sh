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
# llama.cpp for format=gguf exports (llmlab.models.gguf) and its tests: llama-cpp-python compiles llama.cpp
# (measured: see bench/RESULTS.md `gguf`), and llama.cpp's converter, which its wheel does not install, is kept
# from the same sdist. Skipped when both are here; LLMLAB_NO_GGUF=1 skips it (the GGUF tests then skip).
if [ -z "${LLMLAB_NO_GGUF:-}" ] && ! .venv/bin/python -m llmlab.models.gguf check >/dev/null 2>&1; then
  spec=$(.venv/bin/python -c "from llmlab.models.gguf import LLAMA_CPP_PYTHON; print(LLAMA_CPP_PYTHON)")
  sdist_dir=$(mktemp -d)
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "$spec" -d "$sdist_dir"
  sdist=$(ls "$sdist_dir"/llama_cpp_python-*.tar.gz)
  echo "llmlab: building llama.cpp ($spec) for format=gguf; this takes several minutes"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    .venv/bin/python -m pip install -q --disable-pip-version-check "$sdist" "sentencepiece>=0.1.98"
  .venv/bin/python -m llmlab.models.gguf install-converter "$sdist"
  rm -rf "$sdist_dir"
fi
echo "llmlab: environment ready in .venv"
