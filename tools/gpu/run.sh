#!/usr/bin/env bash
# The one command for a GPU machine on which the package is not installed: the GPU tests, then
# tools/gpu/check.py (every Triton kernel against its reference, a tile sweep, timings and goals; its table
# comes last), all output teed to $OUT/log.txt. Run from anywhere; it works in the repository root.
#
#     bash tools/gpu/run.sh              # GPU machine; $OUT is where results go
#     bash tools/gpu/run.sh --smoke      # dry run on a CPU machine (Triton interpreter, tiny sizes)
#
# Imports without pip: mka_compile/ is copied to $MKA_PKG_DIR/mka_compile with kernels/ and passes/ inside
# (the layout pyproject.toml's package-dir describes) and put first on PYTHONPATH; PYTHONSAFEPATH keeps the
# repository root (whose mka_compile/ lacks kernels/) off sys.path.
# Every step has its own timeout, so the whole run ends within T_TESTS + T_CHECK + ~30 s even if a step
# hangs. Environment (defaults): OUT (/tmp/gpu_out), PYTHON (python, else python3), MKA_PKG_DIR (/tmp/pkg),
# T_TESTS (150 s), T_CHECK (420 s; smoke 900 s), SWEEP_BUDGET (170 s), CHECK_ARGS (extra check.py args),
# TEST_IDS (space-separated pytest ids run one by one instead of the whole GPU set; T_EACH s each, 30),
# NO_SWEEP (1: checks, timings and goals only), MODELS_CHECK (1: tools/gpu/models_check.py instead of check.py),
# BOUNDED (1: then tools/gpu/bounded.py, bounded memory against full attention at 4K-128K; T_BOUNDED s, 300).
# A module that fails to import (say hypothesis missing there) does not stop the other GPU tests.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 3

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash tools/gpu/run.sh [--smoke]" >&2
    exit 2
fi
OUT=${OUT:-/tmp/gpu_out}
PY=${PYTHON:-$(command -v python || command -v python3)}
PKG=${MKA_PKG_DIR:-/tmp/pkg}
T_TESTS=${T_TESTS:-150}
T_CHECK=${T_CHECK:-$((SMOKE ? 900 : 420))}
SWEEP_BUDGET=${SWEEP_BUDGET:-170}
mkdir -p "$OUT" || exit 3
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1

step() { echo; echo "== $* ($(date +%T))"; }

main() {
    local t0 t1 rc_tests rc_check
    t0=$(date +%s)
    step "package copy in $PKG"
    rm -rf "$PKG" && mkdir -p "$PKG" &&
        cp -r mka_compile "$PKG/mka_compile" &&
        cp -r kernels "$PKG/mka_compile/kernels" &&
        cp -r passes "$PKG/mka_compile/passes" || { echo "could not build $PKG"; return 3; }
    export PYTHONPATH="$PKG:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"

    step "machine"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
    timeout -k 5 120 "$PY" - <<'EOF' || echo "version probe failed (rc $?)"
import sys, torch, triton, mka_compile
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
print(f"cuda available: {torch.cuda.is_available()}", end="")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f", {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB", end="")
print(f"\nmka_compile from {mka_compile.__file__}")
EOF

    t1=$(date +%s)
    if [[ -n "${TEST_IDS:-}" ]]; then  # chosen tests, one pytest each (T_EACH s), so every traceback is printed
        rc_tests=0
        for id in $TEST_IDS; do
            step "GPU test $id (timeout ${T_EACH:-30}s)"
            timeout -k 5 "${T_EACH:-30}" "$PY" -m pytest -q -p no:cacheprovider --tb=short "$id" || rc_tests=1
        done
    else
        step "GPU tests (pytest -m gpu tests/kernels, timeout ${T_TESTS}s)"
        timeout -k 10 "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels --maxfail=5 -rfE \
            --durations=5 --continue-on-collection-errors
        rc_tests=$?
    fi
    local dt_tests=$(($(date +%s) - t1))

    if [[ "${MODELS_CHECK:-0}" == 1 ]]; then  # converted models on the GPU, eager and under the mka backend
        step "tools/gpu/models_check.py (timeout ${T_CHECK}s)"
        timeout -k 10 "$T_CHECK" "$PY" tools/gpu/models_check.py
        rc_check=$?
        echo "== done: tests rc=$rc_tests, models check rc=$rc_check, total $(($(date +%s) - t0)) s"
        ((rc_tests == 0 && rc_check == 0)) || return 1
        return 0
    fi
    local args=(--out "$OUT")
    [[ "${NO_SWEEP:-0}" == 1 ]] || args+=(--sweep --sweep-budget "$SWEEP_BUDGET")
    ((SMOKE)) && args+=(--smoke)
    # shellcheck disable=SC2206  # CHECK_ARGS is split on purpose
    args+=(${CHECK_ARGS:-})
    step "tools/gpu/check.py ${args[*]} (timeout ${T_CHECK}s)"
    t1=$(date +%s)
    timeout -k 10 "$T_CHECK" "$PY" tools/gpu/check.py "${args[@]}"
    rc_check=$?
    local dt_check=$(($(date +%s) - t1))
    local rc_bounded=0
    if [[ "${BOUNDED:-0}" == 1 ]]; then  # bounded memory end to end (its table comes last)
        local bargs=(--out "$OUT")
        ((SMOKE)) && bargs+=(--device cpu --tiny)
        step "tools/gpu/bounded.py ${bargs[*]} (timeout ${T_BOUNDED:-300}s)"
        timeout -k 10 "${T_BOUNDED:-300}" "$PY" tools/gpu/bounded.py "${bargs[@]}"
        rc_bounded=$?
    fi

    echo
    echo "== done: tests rc=$rc_tests (${dt_tests} s), check rc=$rc_check (${dt_check} s), bounded rc=$rc_bounded," \
        "total $(($(date +%s) - t0)) s; rc 124/137 = timed out; results in $OUT"
    ((rc_tests == 0 && rc_check == 0 && rc_bounded == 0)) || return 1
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
