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
# llama.cpp for format=gguf exports (llmlab.models.gguf) and its tests: llama-cpp-python compiles llama.cpp at
# install (~11 CPU-minutes, bench/RESULTS.md `gguf`; pip caches the built wheel, so a second venv on the same
# machine takes seconds), and llama.cpp's converter, which its wheel does not install, is kept from the same
# version's sdist. Skipped when both are here; LLMLAB_NO_GGUF=1 skips it. A failed build does not fail the
# setup: it says so, and the GGUF tests then skip, each with the reason (the rest of llmlab does not need it).
if [ -z "${LLMLAB_NO_GGUF:-}" ] && ! .venv/bin/python -m llmlab.models.gguf check >/dev/null 2>&1; then
  spec=$(.venv/bin/python -c "from llmlab.models.gguf import LLAMA_CPP_PYTHON; print(LLAMA_CPP_PYTHON)")
  echo "llmlab: installing $spec for format=gguf (a first build of llama.cpp takes several minutes)"
  sdist_dir=$(mktemp -d)
  if CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${PIP[@]}" "${LOCK[@]}" "$spec" "sentencepiece>=0.1.98" \
     && .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "$spec" -d "$sdist_dir" \
     && .venv/bin/python -m llmlab.models.gguf install-converter "$(ls "$sdist_dir"/llama_cpp_python-*.tar.gz)"; then
    :
  else
    echo "llmlab: WARNING: llama-cpp-python or llama.cpp's converter did not install; format=gguf and its tests are unavailable"
  fi
  rm -rf "$sdist_dir"
fi
echo "llmlab: environment ready in .venv"
