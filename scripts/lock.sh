#!/usr/bin/env bash
# Write scripts/constraints.txt: the exact versions of the environment the suite last passed in, which
# scripts/setup.sh installs (pyproject.toml keeps version ranges for users who `pip install` the package).
#
# Refresh (e.g. to take newer libraries), from a checkout:
#   rm -rf .venv && LLMLAB_UNLOCKED=1 bash scripts/setup.sh   # newest versions the ranges allow
#   bash scripts/test.sh                                      # the whole suite must pass with them
#   bash scripts/lock.sh && git add scripts/constraints.txt   # then record them
set -euo pipefail
cd "$(dirname "$0")/.."
out=scripts/constraints.txt
{
  echo "# Versions the llmlab suite passed with (python $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')," \
       "$(date -u +%Y-%m-%d)); used by scripts/setup.sh. Refresh: scripts/lock.sh."
  # local version labels (torch's +cpu) dropped: the same pin then takes the CUDA build on GPU machines;
  # tools that are not llmlab's (linters a developer added by hand) left out
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v '^#' | grep -viE '^(ruff|pip|setuptools|wheel)==' | sed -E 's/\+[A-Za-z0-9.]+$//' | sort -f
} >"$out"
echo "llmlab: wrote $out ($(grep -vc '^#' "$out") packages)"
