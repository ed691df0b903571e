"""tools/gpu/compile_check.py compiles the Triton kernels for a GPU target on this CPU machine: the check that
a kernel edit still compiles (argument specialisation, tuple-of-strides arguments, loop-carried types), which the
interpreter tests cannot give. bfloat16 cases only (about half a minute with a cold Triton cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu" / "compile_check.py"
FAMILIES = ("session_scan", "chunk_update", "flash_attention", "mka_attention", "bounded_attention", "recall_select")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}  # compile for real, not from a cache
    env.pop("TRITON_INTERPRET", None)  # set by the interpreter tests of this process
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("_")]
    assert all(re.search(r"regs\s+\d+", r) for r in rows), res.stdout  # each row: a cubin's resource use
    assert all(any(f in r for r in rows) for f in FAMILIES), res.stdout  # every family's kernels were compiled
    m = re.search(r"^(\d+) compiled, 0 failed \(sm_90\)$", res.stdout, re.M)
    assert m and int(m.group(1)) == len(rows) >= 20, res.stdout
