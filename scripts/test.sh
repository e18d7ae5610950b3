#!/usr/bin/env bash
# Run the test suite. As root with apt (CI), first start a one-node local Slurm cluster so the
# `slurm` tests run for real; elsewhere they skip with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash scripts/slurm_local.sh start >/tmp/llmlab-slurm-start.log 2>&1 \
    || { echo "llmlab: local Slurm did not start (slurm tests will skip):"; tail -5 /tmp/llmlab-slurm-start.log; }
fi
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# one pytest worker per core (pytest-xdist; LLMLAB_TEST_WORKERS=1 for one process), each test process on
# one thread: the tiny models leave a second thread idle (the serial suite used one core of two), and
# two workers x two threads would oversubscribe the cores. conftest.py hands the workers whole modules.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# every tier (plain `pytest` runs only the fast one: pyproject.toml addopts); a -m of yours replaces this one
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${LLMLAB_TEST_WORKERS:-auto}" \
  -m "slow or not slow" "$@"
