#!/usr/bin/env bash
# The whole GPU verification in one command, sized for a short GPU lease:
#   benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--skip STEP,...] [--commit SHA]
# Builds the extension for the visible GPU, runs the GPU smoke tests, compute-sanitizer and `longattn bench`
# on the standard shapes, writes everything to OUTDIR and prints a summary last. The steps, the budget rule
# and the exit status are described in benchmarks/gpu_check.py. $PYTHON picks the interpreter (default python3).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$py" "$here/gpu_check.py" --python "$py" "$@"
