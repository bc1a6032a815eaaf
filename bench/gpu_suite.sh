#!/usr/bin/env bash
# The fast-path issue's GPU table in one run (≤ 8 minutes on one H100/H200): see bench/gpu_suite.py.
#   bench/gpu_suite.sh [OUT_FOLDER]      (default: $OUT when set, else bench/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_FOLDER=${1:-${OUT:-bench}}
mkdir -p "$OUT_FOLDER"
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 480 "$PYTHON" bench/gpu_suite.py --json "$OUT_FOLDER/gpu_suite.json" 2>&1 | tee "$OUT_FOLDER/gpu_suite.log"
