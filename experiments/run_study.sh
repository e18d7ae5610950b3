#!/usr/bin/env bash
# Run one study: every line of experiments/<study>/commands.txt ("label | overrides"), one after the
# other (never in parallel: the timings are the point), each as `python -m llmlab.run <overrides>` into
# outputs/experiments/<study>/<label>, then experiments/<study>/collect.py (table + plot + raw results).
# Usage: bash experiments/run_study.sh <study> [label ...]   (labels: re-run only those lines)
set -euo pipefail
study=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
out=outputs/experiments/$study
mkdir -p "$out"
while IFS='|' read -r label overrides; do
  label=${label//[[:space:]]/}
  [ -z "$label" ] || [[ $label == \#* ]] && continue
  if [ $# -gt 0 ] && [[ ! " $* " == *" $label "* ]]; then continue; fi
  echo "== $study/$label: $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$out/loads.txt"
  # shellcheck disable=SC2086
  "$py" -m llmlab.run $overrides trainer.enable_progress_bar=false hydra.run.dir="$out/$label" \
    > "$out/$label.log" 2>&1 || echo "   FAILED (exit $?): see $out/$label.log" | tee -a "$out/loads.txt"
  echo "   done $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$out/loads.txt"
done < "experiments/$study/commands.txt"
"$py" "experiments/$study/collect.py"
