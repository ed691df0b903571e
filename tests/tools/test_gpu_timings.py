"""tools/gpu/timings.py on the CPU at tiny sizes (``--device cpu --tiny``): a converted tiny Llama against the original,
prefill and cached decode, and the ``mka::`` ops a converted model calls; run as a file and as a module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tiny(args: list[str], tmp_path: Path, safe_path: bool = True, report: str = "timings.json") -> dict:
    """Run a tools/gpu script with ``--device cpu --tiny --out tmp_path``; its JSON ``report`` and ``stdout``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if safe_path:  # as run.sh runs scripts: the current directory is not on sys.path
        env["PYTHONSAFEPATH"] = "1"
    res = subprocess.run(
        [sys.executable, *args, "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"stdout": res.stdout, **json.loads((tmp_path / report).read_text())}


def test_tiny_run_on_cpu(tmp_path: Path) -> None:
    report = run_tiny([str(ROOT / "tools" / "gpu" / "timings.py")], tmp_path)
    models = {r["what"]: r for r in report["models"]}
    for name in ("original (SDPA)", "converted fastmka", "converted mka"):
        for phase in ("prefill", "decode"):
            row = models[f"{name} {phase}"]
            assert math.isfinite(row["ms"]) and row["tokens_s"] > 0 and "error" not in row, row
    assert models["original (SDPA) prefill"]["vs_original"] == 1.0
    ops = {r["what"] for r in report["ops"]}
    assert {"SDPA flash fwd", "mka::flash_attention fwd", "mka::session_scan", "mka::route_mix (3 levels)"} <= ops
    assert all(math.isfinite(r["ms"]) for r in report["ops"])
    assert report["stdout"].rstrip().splitlines()[-1].startswith("converted mka decode")  # the model table is last


def test_module_form_without_ops(tmp_path: Path) -> None:
    """``python -m tools.gpu.timings`` from the repository root (which puts the root on sys.path)."""
    report = run_tiny(["-m", "tools.gpu.timings", "--skip-ops", "--modes", "fastmka"], tmp_path, safe_path=False)
    assert "ops" not in report
    assert [r["what"] for r in report["models"]] == [
        "original (SDPA) prefill",
        "converted fastmka prefill",
        "original (SDPA) decode",
        "converted fastmka decode",
    ]
