#!/usr/bin/env bash
# Reproduce the alignment_methods study in one go (7 runs from one SFT start), then collect.py.
exec bash "$(dirname "$0")/../run_study.sh" alignment_methods "$@"
