#!/usr/bin/env bash
# Reproduce the peft_methods study in one go (7 runs, ~2-3 min each on 2 shared cores), then collect.py.
exec bash "$(dirname "$0")/../run_study.sh" peft_methods "$@"
