#!/usr/bin/env bash
# The GPU check: one command, at most 9 minutes on one H200, a JSON summary on stdout (and in
# $OUT/gpu_check.json when $OUT is set). See benchmarks/gpu_check.py for what it measures.
#   bash benchmarks/gpu_check.sh            # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu      # the same checks, small, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
args=("$@")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  args+=(--json "$OUT/gpu_check.json")
fi
exec timeout 540 "$PY" benchmarks/gpu_check.py "${args[@]}"
