"""tools/gpu_check.py runs end to end: on CPU in --smoke mode (Triton interpreter), on CUDA for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


def test_smoke_on_cpu(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) >= 9
    assert "SDPA/ours" in res.stdout.splitlines()[-12] or "SDPA/ours" in res.stdout


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
