"""The README's main command (tools/demo.py) runs and its checks pass (tiny budget)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import demo  # noqa: E402


def test_demo_passes() -> None:
    assert demo.main(["--pretrain-steps", "10", "--steps", "10"]) == 0
