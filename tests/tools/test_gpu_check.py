"""tools/gpu/check.py and tools/gpu/run.sh run end to end: on CPU in --smoke mode (Triton interpreter), on
CUDA for real."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu" / "check.py"
RUNNER = ROOT / "tools" / "gpu" / "run.sh"
KERNELS = ("flash_fwd", "flash_dkdv", "flash_dq", "mka_fwd", "mka_bwd")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_runner_smoke_on_cpu(tmp_path: Path) -> None:
    """The GPU machine's one command, dry-run: package copied (not installed), GPU tests skipped here,
    checks + sweep + timings in the interpreter; log, JSON and sweep table land in $OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "MKA_PKG_DIR": str(tmp_path / "pkg")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(["bash", str(RUNNER), "--smoke"], capture_output=True, text=True, timeout=900, env=env)
    log = (out / "log.txt").read_text()
    assert res.returncode == 0, log[-4000:] + res.stderr[-2000:]
    assert res.stdout == log  # everything is teed
    assert f"mka_compile from {tmp_path / 'pkg'}" in log  # the copy, not the repository or an install
    assert "tests rc=0" in log and "check rc=0" in log

    report = json.loads((out / "gpu_check.json").read_text())
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) >= 7
    timed = report["timings"]  # the mka:: ops and a converted tiny Llama against the original, all timed
    assert {r["what"] for r in timed["models"]} >= {"original (SDPA) decode", "converted fastmka prefill"}
    assert all(math.isfinite(r["ms"]) for r in timed["ops"] + timed["models"]), timed
    sweep = {e["key"]: e for e in report["sweep"]["kernels"]}
    assert tuple(sweep) == KERNELS
    for key, e in sweep.items():
        assert len(e["results"]) == 2 and all(r["status"] == "ok" for r in e["results"]), (key, e["results"])
        assert e["results"][0]["config"] == e["default"]  # the default is timed first
        best = e["best"]
        assert best is not None and best["check_rel_err"] <= 1e-4, (key, best)
        assert e["speedup"] == pytest.approx(e["results"][0]["ms"] / best["ms"])
        if best["config"] != e["default"]:  # a new winner is also compared with the default's output
            assert best["rel_err_vs_default"] <= 1e-4, (key, best)
    table = (out / "sweep.txt").read_text()
    assert "partial" not in table and all(e["kernel"] in table for e in sweep.values())

    # the normal table comes last: the goals close the gpu_check output
    tail = log[log.rindex("tile sweep:") :]
    assert "check " in tail and "SDPA/ours" in tail and "converted FastMKA decode" in tail.splitlines()[-3]


def test_sweep_budget_and_kernel_choice(tmp_path: Path) -> None:
    """--sweep-only runs just the named kernels' sweeps; a spent budget stops the sweep and says so."""
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--sweep-only", "mka_fwd,flash_fwd", "--sweep-budget", "0"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]  # a budget stop is announced, not a failure
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "checks" not in report and "timings" not in report
    kernels = report["sweep"]["kernels"]
    assert [e["key"] for e in kernels] == ["flash_fwd", "mka_fwd"]
    assert all(e["results"] == [] and "budget spent" in e["stopped"] for e in kernels)
    assert "sweep budget spent" in (tmp_path / "sweep.txt").read_text()

    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--sweep-only", "flash"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "unknown kernel" in bad.stderr and "flash_fwd" in bad.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_run_on_gpu(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--reps", "5"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
