#!/usr/bin/env bash
# The GPU node's side of the offline check (docs/gpu.md): one line per device call.
#   bash benchmarks/gpu_checks.sh add                 # keep the bundle pieces this copy of the repo holds
#   bash benchmarks/gpu_checks.sh check [OPTIONS]     # add, then run benchmarks/gpu_check.py (DALI first)
# The bundle is .gpu-bundle/cpXY/ (XY: this python3's version, read here, never assumed), built by
# benchmarks/gpu_bundle_build.py; pieces are kept in $GPU_BUNDLE_STORE (default /tmp/alexnet-gpu-bundle)
# until all are there, then unpacked to $GPU_BUNDLE_STORE/site. Results go to $OUT (the device tool's
# folder that comes back) or ./gpu-results.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
BUNDLE=.gpu-bundle/$TAG
STORE=${GPU_BUNDLE_STORE:-/tmp/alexnet-gpu-bundle}
if [ ! -f "$BUNDLE/manifest.json" ]; then
  echo "gpu_checks: no $BUNDLE/manifest.json: build the bundle for this python3 (gpu_bundle_build.py --python-version ${TAG:2:1}.${TAG:3}) and carry it" >&2
  exit 2
fi
shopt -s nullglob
PIECES=("$BUNDLE"/site.tgz.*)
python3 benchmarks/gpu_bundle_assemble.py --manifest "$BUNDLE/manifest.json" --store "$STORE" "${PIECES[@]}"
case "${1:-add}" in
  add) ;;
  check) shift
         exec python3 benchmarks/gpu_check.py --extra-site "$STORE/site" --results "${OUT:-gpu-results}" "$@" ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh add | check [gpu_check.py options]" >&2; exit 2 ;;
esac
