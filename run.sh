#!/usr/bin/env bash
# One entry point for a fresh machine; each command sets up its own virtual environment first.
#   ./run.sh demo    the main job (mka-compile demo): inspect, convert, fine-tune, decode + ONNX checks (~2 min)
#   ./run.sh test    the test suite (CPU only; GPU tests skip without CUDA)
#   ./run.sh setup   only create/refresh the environment (.venv, or $MKA_VENV)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MKA_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            "$PY" -m pip install -q "torch>=2.6"                       # CUDA build from PyPI
        elif [ -n "${MKA_TORCH_INDEX:-}" ]; then
            "$PY" -m pip install -q "torch>=2.6" --index-url "$MKA_TORCH_INDEX"   # e.g. .../whl/cpu
        else
            "$PY" -m pip install -q "torch==2.13.0"                    # the CPU wheel on this machine's disk
        fi
    fi
    "$PY" -m pip install -q -e ".[test]"
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; shift; exec "$VENV/bin/mka-compile" demo "$@" ;;
    test) setup; shift; exec "$PY" -m pytest -q "$@" ;;
    *) echo "usage: ./run.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
