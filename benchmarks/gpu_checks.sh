#!/usr/bin/env bash
# Kept for old notes: the GPU checks are benchmarks/gpu_check.py (docs/gpu.md says how to run them).
#   bash benchmarks/gpu_checks.sh RESULTS_DIR [--extra-site DIR] [--phase torch|dali|all]
set -euo pipefail
RESULTS=${1:?usage: bash benchmarks/gpu_checks.sh RESULTS_DIR [gpu_check.py options]}
shift
exec python3 "$(dirname "$0")/gpu_check.py" --results "$RESULTS" "$@"
