#!/usr/bin/env bash
# One entry point for a fresh machine; each command sets up its own virtual environment first.
#   ./run.sh demo            the main job (mka-compile demo): inspect, convert, fine-tune, decode + ONNX checks (~2 min)
#   ./run.sh test            the test suite (CPU only; GPU tests skip without CUDA), on the pinned set (constraints.txt)
#   ./run.sh test --latest   the same suite on the newest releases of every package but torch (in .venv-latest)
#   ./run.sh setup           only create/refresh the environment (.venv, or $MKA_VENV)
set -euo pipefail
cd "$(dirname "$0")"
LATEST=0
if [ "${1:-}" = test ] && [ "${2:-}" = --latest ]; then LATEST=1; set -- test "${@:3}"; fi
VENV="${MKA_VENV:-$([ "$LATEST" = 1 ] && echo .venv-latest || echo .venv)}"
PY="$VENV/bin/python"
export PYTHONSAFEPATH=1  # python -m / -c do not put the checkout's root on sys.path (kernels/ must not shadow `kernels`)

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local gpu=0 pins=(-c constraints.txt)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        if [ "$gpu" = 1 ]; then
            "$PY" -m pip install -q "torch>=2.6,<2.15"                 # CUDA build from PyPI
        elif [ -n "${MKA_TORCH_INDEX:-}" ]; then
            "$PY" -m pip install -q "torch>=2.6,<2.15" --index-url "$MKA_TORCH_INDEX"   # e.g. .../whl/cpu
        else
            "$PY" -m pip install -q "torch==2.13.0"                    # the CPU wheel on this machine's disk
        fi
    fi
    if [ "$gpu" = 1 ]; then  # triton comes with the CUDA torch build
        grep -v '^triton==' constraints.txt > "$VENV/constraints-gpu.txt"
        pins=(-c "$VENV/constraints-gpu.txt")
    fi
    if [ "$LATEST" = 1 ]; then
        "$PY" -m pip install -q -U --upgrade-strategy eager -e ".[test]" "torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
        "$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|onnx|onnxruntime|onnxscript|triton|kernels)=' | tr '\n' ' '
        echo
    else
        "$PY" -m pip install -q "${pins[@]}" -e ".[test]"
    fi
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; shift; exec "$VENV/bin/mka-compile" demo "$@" ;;
    test) setup; shift; exec "$PY" -m pytest -q "$@" ;;
    *) echo "usage: ./run.sh demo|test [--latest]|setup [args...]" >&2; exit 2 ;;
esac
