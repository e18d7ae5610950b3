#!/usr/bin/env bash
# The GPU acceptance run (issue 23 point 4): one command, at most 8 minutes on one H100; see bench/gpu_acceptance.py.
#   bash bench/gpu_acceptance.sh --out /tmp/gpu.md          # on a GPU machine: every check, lines for bench/RESULTS.md
#   bash bench/gpu_acceptance.sh --dry-run --out /tmp/x.md   # anywhere: arguments, plan and result file only
#   bash bench/gpu_acceptance.sh --only attention,mfu        # some checks
# Exit: 0 all passed, 1 a check failed, 2 bad arguments (one `llmlab: error:` line) or no GPU without --dry-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
exec "$PYTHON" bench/gpu_acceptance.py "$@"
