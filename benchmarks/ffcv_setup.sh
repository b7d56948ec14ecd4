#!/usr/bin/env bash
# FFCV 1.0.2 in its own venv (it cannot import in ours: it pins its own numba/opencv stack).
# Used by benchmarks/ffcv_loader.py (the --peer ffcv side of benchmarks/loaders.py) and the
# make_shards-vs-FFCV-writer comparison. Idempotent: does nothing when the venv already imports ffcv.
#
#   bash benchmarks/ffcv_setup.sh            # venv at .ffcv-venv in the repo root
#   FFCV_VENV=/some/dir bash benchmarks/ffcv_setup.sh
#
# Writes $FFCV_VENV/READY once `import ffcv` works there. Needs root for apt (the system JPEG/OpenCV
# libraries FFCV's C extension links against).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FFCV_VENV:-$ROOT/.ffcv-venv}"

works() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import ffcv" >/dev/null 2>&1; }

if works; then
    touch "$VENV/READY"
    echo "ffcv venv ready: $VENV"
    exit 0
fi
rm -f "$VENV/READY"

# System libraries: libturbojpeg (FFCV's JPEG decoder), OpenCV (its resize), pkg-config (its build).
if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y libturbojpeg0-dev libopencv-dev pkg-config
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# opencv-python-headless instead of FFCV's listed opencv-python (the GUI build; not needed);
# torch pinned to the version FFCV 1.0.2 was tried with here.
"$VENV/bin/pip" install -q torch==2.13.0 numpy numba pillow opencv-python-headless terminaltables \
    fastprogress psutil tqdm assertpy fastargs pytorch_pfn_extras
# --no-deps: its metadata asks for opencv-python (GUI) and would pull it over the headless one.
"$VENV/bin/pip" install -q --no-deps ffcv==1.0.2

if works; then
    touch "$VENV/READY"
    echo "ffcv venv ready: $VENV"
else
    echo "ffcv_setup: the venv at $VENV does not import ffcv; see the pip output above" >&2
    exit 1
fi
