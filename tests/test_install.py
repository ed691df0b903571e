"""The package installs, regular and editable, with the mapped ``kernels/`` and ``passes/`` folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import mka_compile, mka_compile.kernels as k, mka_compile.passes, mka_compile.layers, mka_compile.backend;"
    " print(k.__file__)"
)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


@pytest.mark.slow
def test_regular_install_imports_mapped_packages(tmp_path: Path) -> None:
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)], tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = _run([sys.executable, "-c", IMPORTS], tmp_path, env)
    assert Path(where).is_relative_to(target), where
    assert (target / "mka_compile" / "kernels" / "session_scan" / "reference.py").is_file()
    fused = target / "mka_compile" / "kernels" / "fastmka_memory_cpu"  # the C++ sources built on first use ship too
    assert all((fused / f).is_file() for f in ("extension.cpp", "common.h", "forward.h", "backward.h"))
    assert (target / "mka_compile" / "kernels" / "bounded_attention" / "extension.cpp").is_file()
    assert not (target / "kernels").exists()  # mapped, not installed as a top-level package


def test_editable_install_points_at_the_source_tree(tmp_path: Path) -> None:
    """The test environment uses the editable install (./run.sh setup); imports resolve to kernels/."""
    where = _run([sys.executable, "-c", IMPORTS], tmp_path)
    assert Path(where).resolve() == ROOT / "kernels" / "__init__.py"
