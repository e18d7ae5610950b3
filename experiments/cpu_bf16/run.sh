#!/usr/bin/env bash
# Reproduce the cpu_bf16 study in one go: the bare matmul ratio before and after, the 12 training runs
# in between (experiments/cpu_bf16/commands.txt), then collect.py writes results.csv, the table and the plot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd); cd "$root"
py=python; [ -x .venv/bin/python ] && py=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$py" "$here/matmul.py" > "$here/matmul_before.json"
bash experiments/run_study.sh cpu_bf16 "$@"   # ends with collect.py; it is run again below for matmul_after
"$py" "$here/matmul.py" > "$here/matmul_after.json"
"$py" "$here/collect.py"
