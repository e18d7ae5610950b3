#!/usr/bin/env bash
# Run the test suite. As root with apt (CI), first start the local Slurm cluster -- this host's node plus
# two nodes in their own network namespaces (scripts/slurm_local.sh start --nodes 2) -- so the `slurm`
# tests run for real; elsewhere they skip with the reason. LLMLAB_SLURM_NODES=1: the one-node cluster only
# (the two-node tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # (where namespaces are refused, e.g. an unprivileged container, the one-node cluster still serves the rest)
  if ! bash scripts/slurm_local.sh start --nodes "${LLMLAB_SLURM_NODES:-2}" >/tmp/llmlab-slurm-start.log 2>&1; then
    echo "llmlab: local Slurm with ${LLMLAB_SLURM_NODES:-2} node(s) did not start:"; tail -5 /tmp/llmlab-slurm-start.log
    bash scripts/slurm_local.sh start --nodes 1 >>/tmp/llmlab-slurm-start.log 2>&1 \
      && echo "llmlab: started the one-node cluster instead (the two-node tests will skip)" \
      || { echo "llmlab: local Slurm did not start (slurm tests will skip):"; tail -5 /tmp/llmlab-slurm-start.log; }
  fi
fi
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# one pytest worker per core (pytest-xdist; LLMLAB_TEST_WORKERS=1 for one process), each test process on
# one thread: the tiny models leave a second thread idle (the serial suite used one core of two), and
# two workers x two threads would oversubscribe the cores. conftest.py hands the workers whole modules.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# With the local Slurm cluster up, two workers more than cores: the Slurm modules (one unit, ~13 min) mostly
# wait on the cluster (sbatch, node-failure and collective timeouts: ~800 s of wall for ~30 s of the test
# process's CPU on the 2-core AMD EPYC, 2026-12-06), and since the CLI tests fork from a warm interpreter
# (tests/forkserver.py) the others wait about as much as they compute (3 workers: 44 min of CPU in a 44-min
# run on 2 cores, 2026-12-07), waiting on two-process runs' collectives, killed runs and the tiny bases.
workers=${LLMLAB_TEST_WORKERS:-auto}
if [ "$workers" = auto ] && command -v sinfo >/dev/null && timeout 20 sinfo -h >/dev/null 2>&1; then
  workers=$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) + 2 ))  # nproc honours OMP_NUM_THREADS
fi
# every tier (plain `pytest` runs only the fast one: pyproject.toml addopts); a -m of yours replaces this one;
# the 40 slowest tests are listed at the end (where the suite's time goes, in CI's output too)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --durations=40 \
  -m "slow or not slow" "$@"
