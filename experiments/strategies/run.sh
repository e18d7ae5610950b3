#!/usr/bin/env bash
# Reproduce the strategies study: bench/strategies.py's ZeRO memory measurement (2 processes per run,
# ~6 min on a quiet 2-core machine, ~30 with other jobs), its table saved as rerun.md, then collect.py
# (which reads rerun.md when present, else the section of bench/RESULTS.md this study cites).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd); cd "$root"
py=python; [ -x .venv/bin/python ] && py=.venv/bin/python
ds=()
for o in strategy.reduce_bucket_size=5000000 strategy.allgather_bucket_size=5000000 strategy.overlap_comm=false \
  ++strategy.config_overrides.zero_optimization.stage3_prefetch_bucket_size=5000000 \
  ++strategy.config_overrides.zero_optimization.stage3_max_live_parameters=10000000 \
  ++strategy.config_overrides.zero_optimization.stage3_max_reuse_distance=0; do ds+=("--ds-extra=$o"); done
"$py" bench/strategies.py zero_memory --steps 3 "${ds[@]}" | tee "$here/rerun.md"
"$py" "$here/collect.py"
