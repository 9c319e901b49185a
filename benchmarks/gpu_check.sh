#!/usr/bin/env bash
# The first GPU run (see benchmarks/gpu_check.py): on a machine with CUDA, from a copy of the
# tree with .wheels/ and .device/ carried beside it (bash benchmarks/gpu_wheels.sh makes both):
#
#   bash benchmarks/gpu_check.sh                 # results in $OUT, else runs/gpu_check/
#   bash benchmarks/gpu_check.sh --dry           # CPU, gloo, tiny shapes
#
# Exit code 0 only if every stage passed; the results are written either way.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3)"; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
